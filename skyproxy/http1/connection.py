"""One connection to the upstream: its state, the exchange it carries, and whether it may carry another.

NEW -> ACTIVE -> IDLE -> ACTIVE ... -> CLOSED. A connection goes back to IDLE only through
`release()`, and only when `_reusable()` says so: that function is the one place the
decision is made. Anything it does not vouch for closes the connection, since a reused
connection that carries a stray byte can hand one client another client's answer.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

from skyproxy.http1.answer import Answer
from skyproxy.http1.errors import Disconnected, ProtocolError, ReadTimeout, WriteTimeout
from skyproxy.http1.flow import FlowControl
from skyproxy.http1.request import Body, request_head
from skyproxy.http1.settings import Timeouts

if TYPE_CHECKING:
    from skyproxy.http1.pool import Pool


class State(enum.Enum):
    NEW = "new"  # connected, no request yet
    ACTIVE = "active"  # carrying one request and its answer
    IDLE = "idle"  # in the pool, between exchanges
    CLOSED = "closed"


# Looking a member up on an Enum class runs a descriptor (until Python 3.12), several
# times the cost of a global: the hot path compares states through these.
NEW, ACTIVE, IDLE, CLOSED = State.NEW, State.ACTIVE, State.IDLE, State.CLOSED


class Connection(asyncio.Protocol):
    __slots__ = (
        "_answer",
        "_flow",
        "_read_since",
        "_reads",
        "_request_sent",
        "_seen_reads",
        "_seen_writes",
        "_write_since",
        "_writer",
        "_writes",
        "idle_since",
        "pool",
        "state",
        "transport",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.state = NEW
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._flow: FlowControl | None = None
        self._answer: Answer | None = None
        self._writer: asyncio.Task[None] | None = None
        self._request_sent = False
        # Progress counters and when each last moved, for the read and write timeouts.
        self._reads = self._seen_reads = self._writes = self._seen_writes = 0
        self._read_since: float | None = None
        self._write_since: float | None = None

    # -- the exchange --------------------------------------------------------------------
    def begin(
        self, method: str, target: str, head: bytes | bytearray, body: Body, length: int | None
    ) -> Answer:
        """Sends a request; the answer arrives on the returned Answer."""
        flow = self._flow
        if self.state is CLOSED or flow is None:
            raise Disconnected("upstream connection closed")
        self.state = ACTIVE
        answer = self._answer = Answer(flow, head_only=method == "HEAD")
        self._read_since = None
        flow.write(request_head(method, target, self.pool.origin.authority, head, body, length))
        if body is None or isinstance(body, bytes):
            self._request_sent = True
        else:
            self._request_sent = False
            self._writer = asyncio.get_running_loop().create_task(self._write_body(body, length is None))
        return answer

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool, or is closed."""
        answer, self._answer = self._answer, None
        if answer is None:
            return  # released already
        if not answer.complete:
            answer.detach()
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done():
            writer.cancel()  # the answer came before the whole request went: not reusable
        if self._reusable(answer):
            self.state = IDLE
            self.pool.put(self)
        else:
            self.close()

    def _reusable(self, answer: Answer) -> bool:
        """Whether this connection may carry another request: the one place that decides.

        Only when the request went out whole and the answer came in whole, framed by its
        length or last chunk, on HTTP/1.1 with keep-alive, with nothing unexpected. Never
        after a HEAD, 204 or 304: llhttp cannot tell such an answer's end from a body the
        upstream sends anyway, and those bytes would be read as the next answer.
        """
        return (
            self.state is ACTIVE
            and self._request_sent
            and answer.complete
            and answer.error is None
            and answer.framed
            and not answer.bodyless
            and answer.keep_alive
            and answer.version == "1.1"
            and not answer.stray
            and self._flow is not None
            and not self._flow.read_paused
        )

    async def _write_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        """Writes a streamed body; an error ends the exchange with that error."""
        flow = self._flow
        assert flow is not None  # begin() checked
        try:
            async for chunk in body:
                if not chunk:
                    continue
                flow.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                await flow.drain()
            if chunked:
                flow.write(b"0\r\n\r\n")
        except Exception as exc:
            self._fail(exc)
        else:
            self._request_sent = True

    def _fail(self, error: BaseException) -> None:
        answer = self._answer
        if answer is not None:
            answer.fail(error)
        self.close()

    def close(self) -> None:
        if self.state is CLOSED:
            return
        self.state = CLOSED
        if self._flow is not None:
            self._flow.close()
        if self.transport is not None:
            self.transport.close()
        answer = self._answer
        if answer is not None:  # closed mid-exchange (shutdown, a timeout): never a clean end
            answer.fail(Disconnected("upstream connection closed"))
        self.pool.discard(self)

    # -- timeouts ------------------------------------------------------------------------
    def check_timeouts(self, now: float, timeouts: Timeouts) -> None:
        """Called by the client every tick while the connection is in the pool's hands."""
        flow = self._flow
        answer = self._answer
        if flow is None or answer is None or self.state is not ACTIVE:
            return
        if not flow.write_paused or self._write_since is None or self._writes != self._seen_writes:
            self._write_since = now if flow.write_paused else None
            self._seen_writes = self._writes
        elif now - self._write_since >= timeouts.write:
            self._fail(WriteTimeout(f"upstream took none of the request for {timeouts.write:g} s"))
            return
        # An answer is awaited once the request is out (or the answer began early), and
        # not while the reader is the slow one and reading is paused for it.
        waiting = (self._request_sent or answer.status) and not answer.complete and not flow.read_paused
        if not waiting or self._read_since is None or self._reads != self._seen_reads:
            self._read_since = now if waiting else None
            self._seen_reads = self._reads
        elif now - self._read_since >= timeouts.read:
            self._fail(ReadTimeout(f"upstream sent nothing for {timeouts.read:g} s"))

    # -- asyncio's callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:
            return
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._flow = FlowControl(self.transport)

    def data_received(self, data: bytes) -> None:
        answer = self._answer
        if answer is None or answer.complete:
            self.close()  # the upstream spoke while nothing was asked: never to be trusted
            return
        self._reads += 1
        try:
            answer.feed(data)
        except ProtocolError as exc:
            self._fail(exc)
            return
        if answer.stray:
            self.close()

    def eof_received(self) -> bool:
        return False  # close; connection_lost tells the answer

    def connection_lost(self, exc: Exception | None) -> None:
        if self._answer is not None:
            self._answer.lost(exc)  # first: the close may be how its body ends
        self.close()

    def pause_writing(self) -> None:
        if self._flow is not None:
            self._flow.pause_writing()

    def resume_writing(self) -> None:
        self._writes += 1
        if self._flow is not None:
            self._flow.resume_writing()
