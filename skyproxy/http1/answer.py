"""One answer as llhttp parses it: the parser's callback object, the head, the body queue.

The connection feeds the bytes in and one reader (the Response) waits on it. The answer
records what it saw (framing, keep-alive, version, a missing body, stray bytes) and
leaves the decision to reuse the connection to the connection.

Every byte read before a head or a trailer section is complete counts against
MAX_HEAD_BYTES as it arrives: llhttp buffers an unfinished header line whole, so a line
that never ends must be refused while it grows, not once it ends.
"""

from __future__ import annotations

import asyncio

import httptools

from skyproxy.http1.errors import Disconnected, IncompleteBody, ProtocolError
from skyproxy.http1.flow import FlowControl
from skyproxy.http1.settings import HIGH_WATER, MAX_HEAD_BYTES

_NO_BODY_STATUS = frozenset((204, 304))
_VERSIONS = frozenset(("1.1", "1.0"))

Headers = list[tuple[bytes, bytes]]


class _Beyond(Exception):
    """Raised from a callback: a second answer follows the one asked for."""


class Answer:
    __slots__ = (
        "_chunks",
        "_flow",
        "_head_bytes",
        "_parser",
        "_pending",
        "_starts_http11",
        "_unparsed",
        "_waiter",
        "bodyless",
        "complete",
        "content_encoding",
        "content_length",
        "content_type",
        "error",
        "framed",
        "head_only",
        "headers",
        "keep_alive",
        "reason",
        "received",
        "status",
        "stray",
        "trailers",
        "version",
    )

    def __init__(self, flow: FlowControl, head_only: bool) -> None:
        self._flow = flow
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._chunks: list[bytes] = []
        self._pending = 0  # bytes queued and not yet taken by the reader
        self._unparsed = 0  # bytes fed since the parser last produced something
        self._head_bytes = 0
        self._starts_http11: bool | None = None  # the first read began "HTTP/1.1 "
        self._waiter: asyncio.Future[None] | None = None
        self.head_only = head_only  # the request was a HEAD: no body, whatever the head says
        self.status = 0  # set once the final head is complete; 1xx heads are skipped
        self.reason = b""
        self.version = ""
        self.headers: Headers = []
        self.trailers: Headers | None = None  # fields after a chunked body: never in the head
        self.content_length: int | None = None
        self.content_type = ""  # the media type alone, lower case
        self.content_encoding: str | None = None
        self.framed = False  # the body's end is its length or last chunk, not the close
        self.bodyless = False  # a HEAD's, a 204's or a 304's answer
        self.keep_alive = False  # the upstream, as llhttp reads its head, will keep the connection
        self.complete = False
        self.stray = False  # bytes arrived beyond the answer
        self.received = 0  # body bytes
        self.error: BaseException | None = None

    # -- the connection's side -----------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Parses bytes read for this answer. Raises ProtocolError on anything not HTTP."""
        parser = self._parser
        if parser is None:
            return
        self._unparsed += len(data)
        if self._starts_http11 is None:
            self._starts_http11 = data.startswith(b"HTTP/1.1 ")
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise ProtocolError("upstream switched protocols") from None
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # what a callback of ours raised, if it was one
            if isinstance(cause, _Beyond):
                self.stray = True  # the answer is whole; what follows was never asked for
                return
            if isinstance(cause, ProtocolError):
                raise cause from None
            raise ProtocolError(f"malformed answer: {exc}") from None
        if self._unparsed > MAX_HEAD_BYTES and not self.complete:
            what = "trailers" if self.status else "answer head"
            raise ProtocolError(f"{what} over {MAX_HEAD_BYTES} bytes")

    def lost(self, exc: Exception | None) -> None:
        """The connection closed: for a body without framing that is its end."""
        if self.complete or self.error is not None:
            return  # an answer that already failed must not look whole once the close lands
        if not self.status:
            why = f": {exc}" if exc else ""
            self.fail(Disconnected(f"upstream closed the connection before answering{why}"))
        elif self.framed or exc is not None:
            self.fail(IncompleteBody(f"upstream closed the connection mid-body ({self._short()})"))
        else:
            self._finish()

    def fail(self, error: BaseException) -> None:
        if self.error is None and not self.complete:
            self.error = error
        self._wake()

    def detach(self) -> None:
        """The exchange ended before the answer did: the parser goes (see _finish)."""
        self._parser = None

    # -- the reader's side ---------------------------------------------------------------
    async def head(self) -> None:
        """Returns once the final head is complete; raises the answer's error."""
        while not self.status:
            await self.wait()

    async def wait(self) -> None:
        """Returns once something new arrived; raises the answer's error."""
        if self.error is not None:
            raise self.error
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        if self.error is not None:
            raise self.error

    def take(self) -> list[bytes]:
        """The body pieces queued so far; the upstream resumes if it was paused for them."""
        chunks = self._chunks
        if chunks:
            self._chunks = []
            self._pending = 0
            if self._flow.read_paused:
                self._flow.resume_reading()
        return chunks

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _finish(self) -> None:
        self.complete = True
        # The parser holds this answer's bound methods: dropping it once the answer is
        # whole breaks the cycle, so the answer is freed by reference counting, not left
        # to the collector. A parser still inside feed_data() keeps itself alive.
        self._parser = None
        self._wake()

    def _short(self) -> str:
        if self.content_length is not None:
            return f"{self.received} of {self.content_length} bytes"
        return f"{self.received} bytes, no last chunk" if self.framed else f"{self.received} bytes"

    # -- llhttp's callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete:  # llhttp goes on to the next message within the same read
            raise _Beyond

    def on_status(self, reason: bytes) -> None:
        # llhttp calls this once per piece of the line that a read holds.
        self._head_bytes += len(reason)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise ProtocolError(f"answer head over {MAX_HEAD_BYTES} bytes")
        self.reason = self.reason + reason if self.reason else reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            what = "trailers" if self.status else "answer head"
            raise ProtocolError(f"{what} over {MAX_HEAD_BYTES} bytes")
        if self.status:
            if self.trailers is None:
                self.trailers = []
            self.trailers.append((name, value))
            return
        self.headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            self.framed = True
            if value.isdigit():
                self.content_length = int(value)
        elif lower == b"transfer-encoding":
            self.framed = True
        elif lower == b"content-type":
            self.content_type = value.partition(b";")[0].strip().lower().decode("latin-1")
        elif lower == b"content-encoding":
            self.content_encoding = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # it is the parser calling
        status = parser.get_status_code()
        self._unparsed = 0
        if status < 200:  # 100 Continue, 103 Early Hints: informational, the answer follows
            self._starts_http11 = False  # the final answer's status line comes later
            self._reset_head()
            return
        # get_http_version() formats a string, a cost worth skipping on every answer
        # whose status line is plainly HTTP/1.1: the first one read, when it is final.
        version = "1.1" if self._starts_http11 else parser.get_http_version()
        if version not in _VERSIONS:
            raise ProtocolError(f"upstream answered in HTTP/{version}")
        self.version = version
        self.status = status
        self._head_bytes = 0  # from here on it counts the trailers
        if self.head_only or status in _NO_BODY_STATUS:
            self.bodyless = self.framed = True
            self._finish()
        else:
            self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:  # a body after a HEAD's answer
            self.stray = True
            return
        self._unparsed = 0
        self.received += len(body)
        self._chunks.append(body)
        self._pending += len(body)
        if self._pending > HIGH_WATER:
            self._flow.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.status or self.complete:
            return  # the end of an informational answer, or of a HEAD's
        parser = self._parser
        assert parser is not None  # it is the parser calling
        self._unparsed = 0
        self.keep_alive = parser.should_keep_alive()
        self._finish()

    def _reset_head(self) -> None:
        self.headers = []
        self._head_bytes = 0
        self.reason = b""
        self.content_length = None
        self.content_type = ""
        self.content_encoding = None
        self.framed = False
