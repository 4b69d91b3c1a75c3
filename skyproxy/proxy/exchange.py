"""What one exchange carries between its steps: the route upstream, the call, the outcome.

A `Route` is built once per environment and Runtime generation; a `Call` holds one
request's facts from admission to the audit; `forward()` returns an `Outcome`, from
which the handler answers, counts and audits.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from skyproxy.audit.events import Kind
from skyproxy.budgets.enforce import NO_HOLD, Hold
from skyproxy.http1.client import Client, Origin
from skyproxy.keys.sources import Secret
from skyproxy.proxy.deadlines import Deadlines
from skyproxy.proxy.inflight import NO_SLOTS, Slots
from skyproxy.proxy.runtime import EnvRuntime, Runtime

CAPTURE_LIMIT = 65_536  # bytes of a body kept for the audit; bigger bodies are not parsed
# Bodies of a known length up to this are read whole and sent in one write: cheaper than
# streaming them, and memory stays bounded. Anything larger, or of unknown length, streams.
SMALL_BODY = 65_536
EVENT_STREAM_CAPTURE = 4_096  # only the first event of a stream is ever parsed


@dataclass(frozen=True, slots=True)
class Route:
    """One environment's way upstream under one Runtime generation."""

    client: Client
    origin: Origin
    key: Secret
    mask: bytes  # what stands in for the key wherever the upstream echoes it (scrub.py)
    scan_success: bool  # search 2xx/3xx bodies for the key too; false only to benchmark that
    user_header: bytes  # lower case, as raw header names are compared; never sent on
    max_body_bytes: int
    head_timeout: float  # seconds from the request's end until the answer's head arrives
    idle_timeout: float  # seconds a body may stay silent, either way, once it flows
    shortest: float  # the shorter of the two: no phase of an exchange can end sooner
    deadlines: Deadlines
    # Decided once per generation, so that a request to an environment without in-flight
    # caps or budgets makes no call for them.
    capped: bool  # some rule of the environment caps requests in flight
    budgeted: bool  # some budget applies to the environment
    authenticates: bool  # client_auth is not "off": a token is looked for
    token_required: bool  # client_auth is "required"


@dataclass(slots=True)
class Call:
    """One request's facts, from admission to the audit record."""

    request: web.BaseRequest
    runtime: Runtime  # the generation the request runs under, start to finish
    env: EnvRuntime
    request_id: str
    reply: CIMultiDict[str]  # headers every answer to it carries: request id, CORS, rate limits
    kind: Kind | None  # a prediction event the audit records, or None
    user: str | None = None  # who is billed, once admitted
    client: str | None = None  # the client token's name, when one was presented
    body: bytes | None = None  # read whole during admission, to price a create
    model: str | None = None  # the model `body` names, when it was read
    slots: Slots = NO_SLOTS  # in-flight slots held until the exchange ends
    hold: Hold = NO_HOLD  # the budgets' reservation, until the create is recorded

    def release(self) -> None:
        """Gives back what admission took; however the exchange ended, and only once."""
        if self.slots is not NO_SLOTS:
            self.slots.release()
        hold, self.hold = self.hold, NO_HOLD  # a hold is shared: released once per create
        hold.release()


@dataclass(frozen=True, slots=True)
class Failure:
    """Why the proxy answers itself instead of relaying the upstream's answer."""

    status: int
    code: str
    message: str
    close: bool = False  # the connection cannot carry another request (an unread body is on it)


@dataclass(slots=True)
class Outcome:
    """One exchange: the answer relayed or the failure to answer with, and what the audit reads."""

    status: int = 0
    latency_ms: float = 0.0
    response: web.StreamResponse | None = None  # the relayed answer, when the relay finished
    failure: Failure | None = None
    sent: bool = False  # the status line has gone to the client
    broken: bool = False  # the upstream or client went away after the status was sent
    content_encoding: str | None = None
    request_prefix: bytes | bytearray | None = None
    response_prefix: bytes | bytearray | None = None
