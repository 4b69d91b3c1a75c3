"""The client's bounds and timeouts, each default written once here.

The whole-exchange deadline is not here: it belongs to the caller, which knows how long
an answer may take in all. These bound the parts only the client can see: a connect that
hangs, an upstream that goes quiet mid-answer, one that stops taking the request, and a
pool that has no connection to give.
"""

from __future__ import annotations

from dataclasses import dataclass

CONNECT_TIMEOUT = 10.0  # resolving the name and opening the connection, together
# No byte for this long while an answer is awaited or streaming: the upstream is gone.
# Above the 300 s the API caps a stream at, so a live answer is never cut by it.
READ_TIMEOUT = 330.0
WRITE_TIMEOUT = 60.0  # the upstream took none of the request for this long
POOL_TIMEOUT = 30.0  # waiting for a free connection once an origin has max_connections
# Each open stream holds a connection for its whole life; skyproxy is built to hold
# 10,000 streams, so the cap sits above that and below common descriptor limits.
MAX_CONNECTIONS = 16_384
# Kept after a burst, so a busy proxy's next burst finds warm connections, while a burst
# of thousands of streams does not leave thousands of idle sockets behind.
MAX_IDLE = 256
KEEPALIVE = 30.0  # seconds an idle connection is kept; servers commonly allow 60-75
MAX_HEAD_BYTES = 65_536  # an answer's status line and headers together; trailers likewise
HIGH_WATER = 262_144  # bytes of an answer held unread before the upstream is paused
DNS_TTL = 300.0  # seconds a resolved name is reused


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; each a bound on one wait the client owns."""

    connect: float = CONNECT_TIMEOUT
    read: float = READ_TIMEOUT
    write: float = WRITE_TIMEOUT
    pool: float = POOL_TIMEOUT


@dataclass(frozen=True, slots=True)
class Limits:
    """Per origin: connections in all, idle ones kept, and how long an idle one lives."""

    max_connections: int = MAX_CONNECTIONS
    max_idle: int = MAX_IDLE
    keepalive: float = KEEPALIVE

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_idle < 0:
            raise ValueError("max_connections must be at least 1 and max_idle at least 0")
