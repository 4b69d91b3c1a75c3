"""The upstream's answer, relayed to the client as it arrives.

The status line's reason and the upstream's header lines go on as the bytes they came as
(see rawhead.py); the framing is the proxy's own. A small answer of known length goes
out in one write; anything else streams. An error answer (4xx, 5xx) is decoded and
scrubbed of the key on its way, in case the upstream echoes it. Each relay records on
the exchange's `Outcome` when the status line went out and whether the client left
before the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from skyproxy import codings
from skyproxy.codings import Decoder
from skyproxy.http1 import ProtocolError, Response
from skyproxy.proxy import links
from skyproxy.proxy.exchange import CAPTURE_LIMIT, EVENT_STREAM_CAPTURE, SMALL_BODY, Outcome
from skyproxy.proxy.headers import DROP_RESPONSE
from skyproxy.proxy.rawhead import RawHeadResponse, UnsafeHead
from skyproxy.proxy.scrub import Scrubber

# Framing is the proxy's to write: aiohttp sets Content-Length or chunks itself.
_NOT_RELAYED = DROP_RESPONSE | {b"content-length"}


async def relay(
    request: web.BaseRequest,
    upstream: Response,
    reply_headers: CIMultiDict[str],
    key: str,
    fingerprint: str,
    outcome: Outcome,
    rewrite: links.Rewrite | None = None,
) -> web.StreamResponse:
    outcome.content_encoding = upstream.content_encoding
    scrubbed = upstream.status >= 400
    decoder = codings.decoder(upstream.content_encoding) if scrubbed else None
    length = upstream.content_length
    small = not scrubbed and length is not None and length <= SMALL_BODY and request.method != "HEAD"
    response = _response(
        upstream, key.encode(), fingerprint.encode(), decoder is not None, at_once=not small, rewrite=rewrite
    )
    response.headers.extend(reply_headers)
    if scrubbed:
        return await _relay_scrubbed(request, upstream, response, decoder, key, fingerprint, outcome)
    if small:
        body = await upstream.read()
        if rewrite is not None and upstream.status < 300:
            body = rewrite.body(body)
        response.content_length = len(body)
        if outcome.response_prefix is not None:
            outcome.response_prefix = body
        # Sent here, not by aiohttp after the handler returns: the client must not wait
        # for the audit and metrics work that follows the exchange.
        try:
            await response.prepare(request)  # raises too when the client left while we waited
            outcome.sent = True
            await response.write_eof(body)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            outcome.broken = True  # the upstream's answer is whole all the same: the audit keeps it
        return response
    response.content_length = length  # a HEAD's too: it says what a GET would get
    try:
        await response.prepare(request)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        outcome.broken = True
        return response
    outcome.sent = True
    prefix = outcome.response_prefix
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
        outcome.broken = True  # the client left; the upstream connection is closed on release
    return response


def _response(
    upstream: Response,
    key: bytes,
    fingerprint: bytes,
    decoded: bool,
    at_once: bool,
    rewrite: links.Rewrite | None = None,
) -> RawHeadResponse:
    """The client's response, carrying the upstream's header lines byte for byte, less
    the hop-by-hop ones, the framing, CORS and, when the body is decoded, its coding."""
    lines = bytearray()
    count = 0
    for name, value in upstream.headers:
        lower = name.lower()
        # The proxy answers CORS itself, for its own allowed origins; the upstream's
        # (say `Access-Control-Allow-Origin: *`) would contradict or widen that.
        if lower in _NOT_RELAYED or lower.startswith(b"access-control-"):
            continue
        if decoded and lower == b"content-encoding":
            continue
        if rewrite is not None and lower == b"location":
            value = rewrite.location(value.decode("latin-1")).encode("latin-1")
        # replace(), not `key in value` first: `in` on bytes tries the key as an int
        # before searching, and formats (then drops) a TypeError every time.
        lines += b"%s: %s\r\n" % (name, value.replace(key, fingerprint))
        count += 1
    reason = upstream.reason.replace(key, fingerprint)
    try:
        return RawHeadResponse(upstream.status, reason, lines, count, at_once=at_once)
    except UnsafeHead as exc:
        raise ProtocolError(f"upstream answer unsafe to relay: {exc}") from None


async def _relay_scrubbed(
    request: web.BaseRequest,
    upstream: Response,
    response: web.StreamResponse,
    decoder: Decoder | None,
    key: str,
    fingerprint: str,
    outcome: Outcome,
) -> web.StreamResponse:
    # No Content-Length: scrubbing and decoding change the length.
    scrubber = Scrubber(key.encode(), fingerprint.encode())
    prefix = outcome.response_prefix
    await response.prepare(request)
    outcome.sent = True
    async for chunk in upstream.iter_any():
        plain = decoder.decompress(chunk) if decoder else chunk
        if prefix is not None and len(prefix) < CAPTURE_LIMIT:
            prefix += plain[: CAPTURE_LIMIT - len(prefix)]
        await response.write(scrubber.feed(plain))
    if decoder:
        await response.write(scrubber.feed(decoder.flush()))
        outcome.content_encoding = None
    await response.write(scrubber.finish())
    await response.write_eof()
    return response


def cut(transport: asyncio.Transport) -> None:
    """Ends the client's connection with a reset, not a clean close.

    An answer without a length (always so for an HTTP/1.0 client) ends where the
    connection does: after a clean close, a truncated body would look whole. A reset
    (SO_LINGER 0, then abort) is an error the client cannot miss.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed: there is nothing left to cut
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


_LINGER_RESET = struct.pack("ii", 1, 0)
