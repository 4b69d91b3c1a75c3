"""The upstream exchange: one pooled ClientSession per environment, streaming both ways.

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
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

from skyproxy.config import ServerSettings
from skyproxy.deadlines import Deadline, Deadlines

CAPTURE_LIMIT = 65_536  # bytes of a body kept for the audit; bigger bodies are not parsed
# Bodies of a known length up to this are read whole and sent in one write: cheaper than
# streaming them, and memory stays bounded. Anything larger, or of unknown length, streams.
SMALL_BODY = 65_536
EVENT_STREAM_CAPTURE = 4_096  # only the first event of a stream is ever parsed

# Hop-by-hop headers (RFC 9110 7.6.1) and the client's own credentials never travel on.
_DROP_REQUEST = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "x-api-key",
        "authorization",
        "cookie",
        "accept-encoding",
        "x-request-id",
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
_SAFE_ENCODINGS = ("gzip", "deflate", "identity")
X_API_KEY = istr("x-api-key")
X_REQUEST_ID = istr("X-Request-Id")
SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)


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


def open_session(server: ServerSettings) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # bodies pass through byte for byte, encoding included
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        timeout=client_timeout(server),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def client_timeout(server: ServerSettings) -> aiohttp.ClientTimeout:
    # The whole-exchange limit (upstream_timeout) is a Deadline armed in forward(): one
    # shared sweeper instead of aiohttp's timer context per request.
    return aiohttp.ClientTimeout(total=None, sock_connect=server.connect_timeout)


def outbound_headers(
    incoming: CIMultiDictProxy[str], key: str, request_id: str, user_header: str
) -> CIMultiDict[str]:
    """The headers sent upstream. `user_header` is lower case."""
    connection_named = _connection_tokens(incoming)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in _DROP_REQUEST or lower == user_header or lower in connection_named:
            continue
        headers.add(name, value)
    accept = incoming.get("Accept-Encoding")
    if accept:
        # Only encodings we can undo, so an error body can always be scrubbed of the key.
        safe = [t for t in (p.strip() for p in accept.split(",")) if t.split(";")[0] in _SAFE_ENCODINGS]
        if safe:
            headers["Accept-Encoding"] = ", ".join(safe)
    headers[X_API_KEY] = key
    headers[X_REQUEST_ID] = request_id
    return headers


def _connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    value = headers.get("Connection")
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


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
    request: web.Request, server: ServerSettings, exchange: Exchange
) -> bytes | AsyncIterator[bytes] | None:
    if not request.body_exists:
        return None
    length = request.content_length
    if length is not None and length <= SMALL_BODY:
        body = await request.read()
        if exchange.request_prefix is not None:
            exchange.request_prefix = body
        return body
    return _limited_body(request.content, server.max_body_bytes, exchange)


async def forward(
    request: web.Request,
    session: aiohttp.ClientSession,
    url: str,
    headers: CIMultiDict[str],
    reply_headers: CIMultiDict[str],
    timeout: aiohttp.ClientTimeout,
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
    try:
        data = await _body(request, server, exchange)
        deadline = deadlines.arm(server.upstream_timeout)
        async with session.request(
            request.method,
            URL(url, encoded=True),  # as the client encoded it: no re-quoting of path or query
            headers=headers,
            data=data,
            allow_redirects=False,
            timeout=timeout,
        ) as upstream:
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
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
        if exchange.failure is None:
            if isinstance(exc, aiohttp.ConnectionTimeoutError):
                exchange.failure = Failure(502, "upstream_unreachable", "Upstream connect timed out.")
            else:
                exchange.failure = Failure(504, "upstream_timeout", "Upstream did not answer in time.")
    except (aiohttp.ClientError, OSError) as exc:
        if exchange.failure is None:
            exchange.failure = Failure(
                502, "upstream_unreachable", f"Upstream unreachable: {type(exc).__name__}."
            )
    else:
        exchange.latency_ms = (loop.time() - started) * 1000.0
        return response
    finally:
        if deadline is not None:
            deadline.finish()
    exchange.latency_ms = (loop.time() - started) * 1000.0
    if exchange.sent:
        # The status line had gone out; nothing to do but cut the client's connection.
        exchange.broken = True
        if request.transport is not None:
            request.transport.close()
        return None
    return None


async def _relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    reply_headers: CIMultiDict[str],
    key: str,
    fingerprint: str,
    exchange: Exchange,
) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    headers = response.headers
    for name, value in upstream.headers.items():
        lower = name.lower()
        # The proxy answers CORS itself, for its own allowed origins; the upstream's
        # (say `Access-Control-Allow-Origin: *`) would contradict or widen that.
        if lower not in _DROP_RESPONSE and not lower.startswith("access-control-"):
            headers.add(name, value.replace(key, fingerprint) if key in value else value)
    headers.extend(reply_headers)
    encoding = upstream.headers.get("Content-Encoding")
    exchange.content_encoding = encoding
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
        async for chunk in upstream.content.iter_any():
            if prefix is not None and len(prefix) < limit:
                prefix += chunk[: limit - len(prefix)]
            await response.write(chunk)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        exchange.broken = True  # the client left; the upstream side closes with the context
    return response


def _small_response(
    upstream: aiohttp.ClientResponse, streaming: web.StreamResponse, body: bytes, exchange: Exchange
) -> web.StreamResponse:
    headers = streaming.headers
    del headers["Content-Length"]  # web.Response sets it from the body
    response = web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=body)
    if exchange.response_prefix is not None:
        exchange.response_prefix = body
    return response


async def _relay_scrubbed(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
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
    async for chunk in upstream.content.iter_any():
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
