"""The upstream exchange: a keep-alive connection per request in flight, streaming both ways.

`forward()` sends the client's request on with the environment's key and streams the
answer back without buffering it. Connect failures map to 502 and timeouts to 504. An
upstream error body that echoes the key has it replaced by the fingerprint.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.http import HttpVersion11
from multidict import CIMultiDict

from skyproxy.config import ServerSettings
from skyproxy.http1 import Client, ConnectTimeout, Origin, Response, UpstreamError
from skyproxy.proxy.deadlines import Deadline, Deadlines

CAPTURE_LIMIT = 65_536  # bytes of a body kept for the audit; bigger bodies are not parsed
# Bodies of a known length up to this are read whole and sent in one write: cheaper than
# streaming them, and memory stays bounded. Anything larger, or of unknown length, streams.
SMALL_BODY = 65_536
EVENT_STREAM_CAPTURE = 4_096  # only the first event of a stream is ever parsed

# Hop-by-hop headers (RFC 9110 7.6.1), the client's own credentials, and the framing
# (the client sets that itself) never travel on.
_DROP_REQUEST = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"x-api-key",
        b"authorization",
        b"cookie",
        b"accept-encoding",
        b"x-request-id",
        b"content-length",
        b"expect",
    )
)
_DROP_RESPONSE = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "set-cookie",
        "x-request-id",
    )
)
_SAFE_ENCODINGS = (b"gzip", b"deflate", b"identity")

RawHeaders = tuple[tuple[bytes, bytes], ...]


class BodyTooLarge(Exception):
    """The client's body crossed max_body_bytes while it streamed."""


@dataclass(slots=True)
class Failure:
    status: int
    code: str
    message: str


@dataclass(slots=True)
class Exchange:
    """What the handler learns from one upstream exchange, for the audit and metrics."""

    status: int = 0
    latency_ms: float | None = None
    failure: Failure | None = None
    sent: bool = False  # the status line has gone to the client
    broken: bool = False  # the upstream or client went away after the status was sent
    content_encoding: str | None = None
    request_prefix: bytes | bytearray | None = None
    response_prefix: bytes | bytearray | None = None


def outbound_head(raw: RawHeaders, key: bytes, request_id: str, user_header: bytes) -> bytearray:
    """The header lines sent upstream, byte for byte as the client sent them, less the
    dropped ones. `user_header` is lower case."""
    connection_named = _connection_tokens(raw)
    out = bytearray()
    accept: list[bytes] = []
    for name, value in raw:
        lower = name.lower()
        if lower in _DROP_REQUEST or lower == user_header or lower in connection_named:
            if lower == b"accept-encoding":
                accept.append(value)
            continue
        out += b"%s: %s\r\n" % (name, value)
    if accept:
        # Only encodings we can undo, so an error body can always be scrubbed of the key.
        tokens = (t.strip() for v in accept for t in v.split(b","))
        safe = [t for t in tokens if t.split(b";")[0].strip().lower() in _SAFE_ENCODINGS]
        if safe:
            out += b"Accept-Encoding: %s\r\n" % b", ".join(safe)
    out += b"x-api-key: %s\r\nX-Request-Id: %s\r\n" % (key, request_id.encode())
    return out


def _connection_tokens(raw: RawHeaders) -> frozenset[bytes]:
    named = [value for name, value in raw if name.lower() == b"connection"]
    if not named:
        return frozenset()
    return frozenset(t.strip().lower() for value in named for t in value.split(b",") if t.strip())


async def _limited_body(
    content: aiohttp.StreamReader, limit: int, exchange: Exchange
) -> AsyncIterator[bytes]:
    total = 0
    prefix = exchange.request_prefix
    async for chunk in content.iter_any():
        total += len(chunk)
        if total > limit:
            exchange.failure = Failure(413, "body_too_large", f"Request body exceeds {limit} bytes.")
            raise BodyTooLarge
        if prefix is not None and len(prefix) < CAPTURE_LIMIT:
            prefix += chunk[: CAPTURE_LIMIT - len(prefix)]
        yield chunk


async def _body(
    request: web.BaseRequest, server: ServerSettings, exchange: Exchange
) -> tuple[bytes | AsyncIterator[bytes] | None, int | None]:
    """The body to send, and its length when it streams with a known one."""
    if not request.body_exists:
        return None, None
    if request.version == HttpVersion11 and "Expect" in request.headers:
        # Only now, once the request is admitted: a refused client never uploads.
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not started
    length = request.content_length
    if length is not None and length <= SMALL_BODY:
        body = await request.read()
        if exchange.request_prefix is not None:
            exchange.request_prefix = body
        return body, None
    return _limited_body(request.content, server.max_body_bytes, exchange), length


async def forward(
    request: web.BaseRequest,
    client: Client,
    origin: Origin,
    head: bytearray,
    reply_headers: CIMultiDict[str],
    server: ServerSettings,
    key: str,
    fingerprint: str,
    exchange: Exchange,
    deadlines: Deadlines,
) -> web.StreamResponse | None:
    """Run the exchange. Returns the response sent, or None with `exchange.failure` set."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline: Deadline | None = None
    upstream: Response | None = None
    try:
        body, length = await _body(request, server, exchange)
        deadline = deadlines.arm(server.upstream_timeout)
        # The target goes on as the client encoded it: no re-quoting of path or query.
        upstream = await client.request(request.method, origin, request.raw_path, head, body, length)
        exchange.status = upstream.status
        response = await _relay(request, upstream, reply_headers, key, fingerprint, exchange)
    except asyncio.CancelledError:
        if deadline is None or not deadline.fired:
            raise  # a shutdown's or a client's cancellation, not ours to turn into a 504
        deadline.absorb()
        if exchange.failure is None:
            exchange.failure = Failure(504, "upstream_timeout", "Upstream did not answer in time.")
    except BodyTooLarge:
        pass
    except ConnectTimeout:
        if exchange.failure is None:
            exchange.failure = Failure(502, "upstream_unreachable", "Upstream connect timed out.")
    except (UpstreamError, aiohttp.ClientError, OSError) as exc:
        if exchange.failure is None:
            why = str(exc) if isinstance(exc, UpstreamError) else type(exc).__name__
            exchange.failure = Failure(502, "upstream_unreachable", f"Upstream unreachable: {why}.")
    else:
        exchange.latency_ms = (loop.time() - started) * 1000.0
        return response
    finally:
        if deadline is not None:
            deadline.finish()
        if upstream is not None:
            upstream.release()
    exchange.latency_ms = (loop.time() - started) * 1000.0
    if exchange.sent:
        # The status line had gone out; nothing to do but cut the client's connection.
        exchange.broken = True
        if request.transport is not None:
            request.transport.close()
        return None
    return None


async def _relay(
    request: web.BaseRequest,
    upstream: Response,
    reply_headers: CIMultiDict[str],
    key: str,
    fingerprint: str,
    exchange: Exchange,
) -> web.StreamResponse:
    reason = upstream.reason.decode("latin-1")
    response = web.StreamResponse(status=upstream.status, reason=reason or None)
    headers = response.headers
    for raw_name, raw_value in upstream.headers:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("utf-8", "surrogateescape")
        lower = name.lower()
        # The proxy answers CORS itself, for its own allowed origins; the upstream's
        # (say `Access-Control-Allow-Origin: *`) would contradict or widen that.
        if lower not in _DROP_RESPONSE and not lower.startswith("access-control-"):
            headers.add(name, value.replace(key, fingerprint) if key in value else value)
    headers.extend(reply_headers)
    exchange.content_encoding = upstream.content_encoding
    if upstream.status >= 400:
        return await _relay_scrubbed(request, upstream, response, key, fingerprint, exchange)
    length = upstream.content_length
    if length is not None and length <= SMALL_BODY and request.method != "HEAD":
        small = _small_response(upstream, response, await upstream.read(), exchange)
        # Sent here, not by aiohttp after the handler returns: the client must not wait
        # for the audit and metrics work that follows the exchange.
        await small.prepare(request)
        exchange.sent = True
        try:
            await small.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            exchange.broken = True
        return small
    await response.prepare(request)
    exchange.sent = True
    prefix = exchange.response_prefix
    limit = CAPTURE_LIMIT
    if upstream.content_type == "text/event-stream":
        limit = EVENT_STREAM_CAPTURE
    try:
        async for chunk in upstream.iter_any():
            if prefix is not None and len(prefix) < limit:
                prefix += chunk[: limit - len(prefix)]
            await response.write(chunk)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        exchange.broken = True  # the client left; the upstream connection is closed on release
    return response


def _small_response(
    upstream: Response, streaming: web.StreamResponse, body: bytes, exchange: Exchange
) -> web.StreamResponse:
    headers = streaming.headers
    del headers["Content-Length"]  # web.Response sets it from the body
    response = web.Response(status=streaming.status, reason=streaming.reason, headers=headers, body=body)
    if exchange.response_prefix is not None:
        exchange.response_prefix = body
    return response


async def _relay_scrubbed(
    request: web.BaseRequest,
    upstream: Response,
    response: web.StreamResponse,
    key: str,
    fingerprint: str,
    exchange: Exchange,
) -> web.StreamResponse:
    headers = response.headers
    headers.popall("Content-Length", None)
    decoder = _decoder(headers.get("Content-Encoding"))
    if decoder is not None:
        del headers["Content-Encoding"]
    scrubber = Scrubber(key.encode(), fingerprint.encode())
    prefix = exchange.response_prefix
    await response.prepare(request)
    exchange.sent = True
    async for chunk in upstream.iter_any():
        plain = decoder.decompress(chunk) if decoder else chunk
        if prefix is not None and len(prefix) < CAPTURE_LIMIT:
            prefix += plain[: CAPTURE_LIMIT - len(prefix)]
        await response.write(scrubber.feed(plain))
    if decoder:
        await response.write(scrubber.feed(decoder.flush()))
        exchange.content_encoding = None
    await response.write(scrubber.finish())
    await response.write_eof()
    return response


def _decoder(encoding: str | None) -> zlib._Decompress | None:
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    return None


class Scrubber:
    """Replaces a needle in a stream, including occurrences split across chunks."""

    __slots__ = ("_carry", "_keep", "_needle", "_replacement")

    def __init__(self, needle: bytes, replacement: bytes) -> None:
        self._needle = needle
        self._replacement = replacement
        self._keep = max(len(needle) - 1, 0)
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        data = (self._carry + chunk).replace(self._needle, self._replacement)
        if len(data) <= self._keep:
            self._carry = data
            return b""
        cut = len(data) - self._keep
        self._carry = data[cut:]
        return data[:cut]

    def finish(self) -> bytes:
        rest, self._carry = self._carry, b""
        return rest
