"""What one exchange with the upstream produces, and the sizes that bound what it keeps.

`forward()` returns an `Outcome`: the handler answers, counts and audits from it.
"""

from __future__ import annotations

from dataclasses import dataclass

CAPTURE_LIMIT = 65_536  # bytes of a body kept for the audit; bigger bodies are not parsed
# Bodies of a known length up to this are read whole and sent in one write: cheaper than
# streaming them, and memory stays bounded. Anything larger, or of unknown length, streams.
SMALL_BODY = 65_536
EVENT_STREAM_CAPTURE = 4_096  # only the first event of a stream is ever parsed


@dataclass(slots=True)
class Failure:
    """Why the proxy answers itself instead of relaying the upstream's answer."""

    status: int
    code: str
    message: str


@dataclass(slots=True)
class Outcome:
    """One exchange, for the answer, the audit and the metrics."""

    status: int = 0
    latency_ms: float | None = None
    failure: Failure | None = None
    sent: bool = False  # the status line has gone to the client
    broken: bool = False  # the upstream or client went away after the status was sent
    content_encoding: str | None = None
    request_prefix: bytes | bytearray | None = None
    response_prefix: bytes | bytearray | None = None
