"""The upstream's HTTP/1.1 client: a keep-alive pool and llhttp's parser, streaming both ways.

aiohttp's ClientSession spent about 330,000 CPU instructions on each small proxied
request (callgrind), more than all the rest of skyproxy's work on it, for features a
proxy does not use: cookies, redirects, auth, tracing, a timer context per request.
This client writes a request in one call, parses the answer with llhttp (httptools,
uvicorn's parser), and an answer that arrives in one read is whole before the waiting
task resumes. What it deliberately does not do: HTTP/2, proxies, redirects, upgrades.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

KEEPALIVE = 30.0  # seconds an idle connection is kept; servers commonly allow 60-75
MAX_HEAD_BYTES = 65_536  # an answer's status line and headers together
HIGH_WATER = 262_144  # bytes of an answer held before the upstream is asked to pause
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"))
_NO_BODY_STATUS = frozenset((204, 304))


class UpstreamError(Exception):
    """The upstream could not be reached, or broke the exchange."""


class ConnectFailed(UpstreamError):
    pass


class ConnectTimeout(ConnectFailed):
    pass


class ProtocolError(UpstreamError):
    """The upstream answered with something that is not HTTP/1.1."""


class Disconnected(UpstreamError):
    """The upstream closed the connection before the answer was complete."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: scheme, host and port, and the Host header that names them."""

    tls: bool
    host: str
    port: int
    authority: bytes

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        tls = parts.scheme == "https"
        host = parts.hostname
        # Built from host and port, not copied from the URL: credentials in a URL's
        # userinfo must never travel in a Host header.
        authority = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            authority += f":{parts.port}"
        return cls(tls, host, parts.port or (443 if tls else 80), authority.encode("idna"))


class _Beyond(Exception):
    """Raised from the parser's callbacks: a second answer follows the one asked for."""


class Response:
    """One upstream answer: status and headers once it starts, the body as it comes.

    It is also the parser's callback object, so llhttp calls straight into it.
    """

    __slots__ = (
        "_chunks",
        "_complete",
        "_conn",
        "_error",
        "_head_bytes",
        "_head_only",
        "_parser",
        "_paused",
        "_pending",
        "_reusable",
        "_waiter",
        "_writer",
        "content_encoding",
        "content_length",
        "content_type",
        "delimited",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, conn: _Connection, method: str) -> None:
        self._conn = conn
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._head_only = method == "HEAD"
        self._chunks: list[bytes] = []
        self._pending = 0
        self._paused = False
        self._complete = False
        self._reusable = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._head_bytes = 0
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self.content_type = ""
        self.content_encoding: str | None = None
        self.delimited = False  # the body's end is framed (length or chunks), not the close

    # -- what the proxy uses -----------------------------------------------------------
    async def read(self) -> bytes:
        """The whole body."""
        while not self._complete:
            await self._wait()
        if len(self._chunks) == 1:
            return self._chunks[0]
        return b"".join(self._chunks)

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body in the pieces it arrives in, the upstream paused while they are not taken."""
        while True:
            if self._chunks:
                chunks, self._chunks = self._chunks, []
                self._pending = 0
                if self._paused:
                    self._paused = False
                    self._conn.resume_reading()
                for chunk in chunks:
                    yield chunk
            elif self._complete:
                return
            else:
                await self._wait()

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool, or is closed."""
        conn = self._conn
        conn.response = None
        # The parser holds this answer's bound methods: dropping it breaks the cycle,
        # so the answer is freed by reference counting, not left to the collector.
        self._parser = None
        writer = self._writer
        if writer is not None and not writer.done():
            writer.cancel()
            conn.close()
        elif self._complete and self._reusable and self._error is None:
            conn.client.put(conn)
        else:
            conn.close()

    # -- the exchange ------------------------------------------------------------------
    async def _start(self) -> None:
        while not self.status:
            await self._wait()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, error: BaseException) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self._wake()

    def feed(self, data: bytes) -> None:
        parser = self._parser
        if self._complete or parser is None:
            self._reusable = False  # bytes beyond the answer: the connection is not trusted
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._conn.close()
            self.fail(ProtocolError("upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._conn.close()
            cause = exc.__context__  # what a callback of ours raised, if it was one
            if isinstance(cause, _Beyond):
                return  # the answer is whole; what follows it was never asked for
            self.fail(cause if isinstance(cause, ProtocolError) else ProtocolError("malformed answer"))

    def lost(self, exc: Exception | None) -> None:
        if self._complete or self._error is not None:
            return  # an answer that already failed must not look whole once the close lands
        if self.status and not self.delimited and not self._head_only:
            self._finish(reusable=False)  # a body without framing ends with the connection
            return
        self.fail(Disconnected("upstream closed the connection" + (f": {exc}" if exc else "")))

    def _finish(self, reusable: bool) -> None:
        self._complete = True
        self._reusable = reusable
        self._wake()

    # -- llhttp's callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._complete:  # llhttp goes on to the next message within the same read
            self._reusable = False
            raise _Beyond

    def on_status(self, reason: bytes) -> None:
        self.reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise ProtocolError(f"answer headers over {MAX_HEAD_BYTES} bytes")
        text = value.decode("utf-8", "surrogateescape")
        key = name.decode("latin-1")
        self.headers.append((key, text))
        lower = key.lower()
        if lower == "content-length":
            self.delimited = True
            if text.isdigit():
                self.content_length = int(text)
        elif lower == "transfer-encoding":
            self.delimited = True
        elif lower == "content-type":
            self.content_type = text.partition(";")[0].strip().lower()
        elif lower == "content-encoding":
            self.content_encoding = text

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # it is the parser calling
        status = parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: informational, the answer follows
            self._reset_head()
            return
        self.status = status
        if self._head_only or status in _NO_BODY_STATUS:
            self.delimited = True
            self._finish(parser.should_keep_alive())
        else:
            self._wake()

    def on_body(self, body: bytes) -> None:
        if self._complete:  # a body after a HEAD's or a 204's answer
            self._reusable = False
            return
        self._chunks.append(body)
        self._pending += len(body)
        if self._pending > HIGH_WATER and not self._paused:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.status or self._complete:
            return  # the end of an informational answer, or of a HEAD's
        parser = self._parser
        assert parser is not None  # it is the parser calling
        self._finish(parser.should_keep_alive())

    def _reset_head(self) -> None:
        self.headers = []
        self._head_bytes = 0
        self.reason = ""
        self.content_length = None
        self.content_type = ""
        self.content_encoding = None
        self.delimited = False


class _Connection(asyncio.Protocol):
    __slots__ = ("_drained", "client", "closed", "idle_since", "origin", "response", "transport")

    def __init__(self, client: Client, origin: Origin) -> None:
        self.client = client
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:
            return
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.client.opened(self)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            self.close()  # the server spoke while nothing was asked: not to be reused
            return
        response.feed(data)

    def eof_received(self) -> bool:
        return False  # close; connection_lost tells the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client.closed(self)
        if self.response is not None:
            self.response.lost(exc)
        self._resume_writer()

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._resume_writer()

    def _resume_writer(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)  # drain() then sees `closed` if that is why

    async def drain(self) -> None:
        if self._drained is not None:
            await self._drained
        if self.closed:
            raise ConnectionResetError("upstream connection closed")

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def write(self, data: bytes | bytearray) -> None:
        if self.closed or self.transport is None:
            raise ConnectionResetError("upstream connection closed")
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
            self.closed = True


Body = bytes | AsyncIterator[bytes] | None


class Client:
    """A pool of keep-alive connections per origin, for one environment's whole life."""

    def __init__(self, connect_timeout: float, keepalive: float = KEEPALIVE) -> None:
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._tls: ssl.SSLContext | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self._closing = False
        self.opened_total = 0  # connections ever opened: against requests, how well reuse works

    async def request(
        self,
        method: str,
        origin: Origin,
        target: str,
        head: bytes | bytearray,
        body: Body,
        length: int | None = None,
    ) -> Response:
        """Send a request and wait for its answer's status and headers.

        `head` holds the header lines, each ending in CRLF, without Host or framing;
        `length` is a streamed body's length when known (else it is sent chunked).
        The caller must call `release()` on the answer.
        """
        while True:
            conn, reused = await self._acquire(origin)
            response = Response(conn, method)
            conn.response = response
            try:
                self._send(conn, response, method, target, head, body, length)
                await response._start()
            except Disconnected:
                response.release()
                # A kept-alive connection the server closed just as we used it: try the
                # next one, but only where sending twice cannot do anything twice. A
                # fresh connection is never retried, so this ends.
                replayable = body is None or isinstance(body, bytes)
                if reused and replayable and method in IDEMPOTENT:
                    continue
                raise
            except BaseException:
                response.release()
                raise
            return response

    def _send(
        self,
        conn: _Connection,
        response: Response,
        method: str,
        target: str,
        head: bytes | bytearray,
        body: Body,
        length: int | None,
    ) -> None:
        out = bytearray(
            b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode(), target.encode(), conn.origin.authority)
        )
        out += head
        if body is None:
            if method in ("POST", "PUT", "PATCH"):
                out += b"Content-Length: 0\r\n"
            out += b"\r\n"
            conn.write(out)
        elif isinstance(body, bytes):
            out += b"Content-Length: %d\r\n\r\n" % len(body)
            out += body
            conn.write(out)
        else:
            chunked = length is None
            if length is None:
                out += b"Transfer-Encoding: chunked\r\n\r\n"
            else:
                out += b"Content-Length: %d\r\n\r\n" % length
            conn.write(out)
            response._writer = asyncio.get_running_loop().create_task(
                _stream_body(conn, response, body, chunked)
            )

    async def _acquire(self, origin: Origin) -> tuple[_Connection, bool]:
        idle = self._idle.get(origin)
        if idle:
            limit = asyncio.get_running_loop().time() - self.keepalive
            while idle:
                conn = idle.pop()  # the most recently used: the least likely to be stale
                if not conn.closed and conn.idle_since > limit:
                    return conn, True
                conn.close()
        return await self._connect(origin), False

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if origin.tls else None
        try:
            transport, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                ),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            raise ConnectTimeout("upstream connect timed out") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect: {type(exc).__name__}") from None
        if conn.transport is None:  # uvloop may run connection_made after returning
            conn.connection_made(transport)
        return conn

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def put(self, conn: _Connection) -> None:
        if self._closing:
            conn.close()  # an exchange that finished during shutdown
        if conn.closed:
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        self._idle.setdefault(conn.origin, []).append(conn)
        if self._sweep is None:
            self._sweep = loop.call_later(self.keepalive, self._expire)

    def _expire(self) -> None:
        self._sweep = None
        limit = asyncio.get_running_loop().time() - self.keepalive
        for origin, idle in list(self._idle.items()):
            fresh = [conn for conn in idle if not conn.closed and conn.idle_since > limit]
            for conn in idle:
                if conn.idle_since <= limit:
                    conn.close()
            if fresh:
                self._idle[origin] = fresh
            else:
                del self._idle[origin]
        if self._idle:
            self._sweep = asyncio.get_running_loop().call_later(self.keepalive, self._expire)

    def opened(self, conn: _Connection) -> None:
        self._open.add(conn)
        self.opened_total += 1

    def closed(self, conn: _Connection) -> None:
        self._open.discard(conn)

    @property
    def connections(self) -> int:
        return len(self._open)

    @property
    def idle(self) -> int:
        return sum(not conn.closed for idle in self._idle.values() for conn in idle)

    async def close(self) -> None:
        self._closing = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._idle.clear()
        for conn in list(self._open):
            conn.close()
        await asyncio.sleep(0)  # let the transports run connection_lost


async def _stream_body(
    conn: _Connection, response: Response, body: AsyncIterator[bytes], chunked: bool
) -> None:
    """Writes a streamed body; an error ends the exchange with that error."""
    try:
        async for chunk in body:
            if not chunk:
                continue
            if chunked:
                conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                conn.write(chunk)
            await conn.drain()
        if chunked:
            conn.write(b"0\r\n\r\n")
    except Exception as exc:
        conn.close()
        response.fail(exc)
