"""The upstream's answer, relayed to the client as it arrives, with the key kept out of it.

The status line's reason and the upstream's header lines go on as the bytes they came as
(see rawhead.py), less the hop-by-hop ones and any whose name holds the key, with the
key masked in values and in the reason; the framing is the proxy's own, and trailers
are never relayed. Every body is searched for the key, on every status, and the key is
masked where found (scrub.py):
- a small identity answer of known length is read whole, searched once, sent in one write;
- any other identity answer streams, searched piece by piece as it passes;
- a coded answer is decoded (decoded.py), an error one whole and under a bound before
  anything is sent, a success one as it streams, and goes on decoded.
On prediction paths, a JSON success answer's links are moved to the proxy (links.py):
a small identity one as it is read whole; any other (longer, without a length, coded)
is gathered, decoded, up to `links.MAX_BODY` and sent whole, rewritten, when it ends
within that; one that goes on past it streams on from there as it comes, unrewritten.
While a body moves, each piece from the upstream and each write the client takes moves
the deadline on by `idle_timeout`: a body is cut only when it stays silent that long,
either way. Each relay records on the exchange's `Outcome` when the status line went out
and whether the client left before the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

import aiohttp
from aiohttp import web

from skyproxy import codings
from skyproxy.codings import Undecodable
from skyproxy.http1 import ProtocolError, Response
from skyproxy.proxy import decoded, links
from skyproxy.proxy.deadlines import Deadline
from skyproxy.proxy.decoded import UNDECODABLE, Unrelayable
from skyproxy.proxy.exchange import CAPTURE_LIMIT, EVENT_STREAM_CAPTURE, SMALL_BODY, Call, Outcome, Route
from skyproxy.proxy.headers import DROP_RESPONSE
from skyproxy.proxy.rawhead import RawHeadResponse, UnsafeHead
from skyproxy.proxy.scrub import Scrubber

# Framing is the proxy's to write: aiohttp sets Content-Length or chunks itself.
_NOT_RELAYED = DROP_RESPONSE | {b"content-length"}
_BODILESS = frozenset((204, 304))


async def relay(
    call: Call,
    upstream: Response,
    route: Route,
    key: bytes,
    outcome: Outcome,
    deadline: Deadline,
    rewrite: links.Rewrite | None = None,
) -> web.StreamResponse:
    """Relays the answer; raises Unrelayable, before anything is sent, for one that cannot be."""
    request = call.request
    status = upstream.status
    bodiless = status in _BODILESS or request.method == "HEAD"
    # scan_success_bodies = false (benchmark only) leaves success bodies as they come.
    scan = status >= 400 or route.scan_success
    coding = upstream.content_encoding
    if coding is not None and scan and not bodiless:
        names = codings.parse(coding)
        if names is None:
            raise Unrelayable(UNDECODABLE)
        if names:
            return await _relay_decoded(call, upstream, route, key, names, outcome, deadline, rewrite)
    outcome.content_encoding = coding
    length = upstream.content_length
    mask = route.mask
    if length is not None and length <= SMALL_BODY and not bodiless:
        response = _response(upstream, key, mask, decoded=False, at_once=False, rewrite=rewrite)
        response.headers.extend(call.reply)
        body = await upstream.read()
        if rewrite is not None and status < 300:
            body = rewrite.body(body)
        if scan:
            # replace(), not `key in body` first: `in` on bytes tries the key as an int
            # before it searches, and formats (then drops) a TypeError every time; a
            # replace() that finds nothing returns the body itself, uncopied.
            body = body.replace(key, mask)
        # Inline, not _send(): a coroutine less on the path most answers take.
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
    # A JSON answer is gathered to move its links; anything else streams at once.
    gather = rewrite is not None and status < 300 and not bodiless and _gathers(upstream, length)
    response = _response(upstream, key, mask, decoded=False, at_once=not gather, rewrite=rewrite)
    response.headers.extend(call.reply)
    response.content_length = length  # a HEAD's too: it says what a GET would get
    scrubber = Scrubber(key, mask) if scan else None
    if gather:
        assert rewrite is not None  # for mypy: `gather` holds only with one
        pieces = upstream.iter_any()
        return await _relay_gathered(request, pieces, response, rewrite, scrubber, outcome, deadline, route)
    return await _relay_stream(request, upstream, response, scrubber, outcome, deadline, route.idle_timeout)


def _gathers(upstream: Response, length: int | None) -> bool:
    """A JSON answer that may be read whole to move its links: an event stream, or any
    other media type, streams as it comes, and one announced over the bound cannot be."""
    kind = upstream.content_type
    return (kind == "application/json" or kind.endswith("+json")) and (
        length is None or length <= links.MAX_BODY
    )


async def _relay_decoded(
    call: Call,
    upstream: Response,
    route: Route,
    key: bytes,
    names: Sequence[str],
    outcome: Outcome,
    deadline: Deadline,
    rewrite: links.Rewrite | None,
) -> web.StreamResponse:
    """A coded answer, relayed decoded: an error one whole; a JSON success one on a
    prediction path gathered to move its links; any other success one as it streams."""
    outcome.content_encoding = None  # what the audit reads is decoded
    response = _response(upstream, key, route.mask, decoded=True, at_once=False, rewrite=rewrite)
    response.headers.extend(call.reply)
    if upstream.status >= 400:
        body = await decoded.whole(upstream, names, deadline, route.idle_timeout)
        return await _send(call.request, response, body.replace(key, route.mask), outcome)
    if rewrite is not None and upstream.status < 300 and _gathers(upstream, None):
        pieces = decoded.pieces(upstream, names, deadline, route.idle_timeout)
        scrubber = Scrubber(key, route.mask)
        return await _relay_gathered(
            call.request, pieces, response, rewrite, scrubber, outcome, deadline, route
        )
    return await _relay_decoding(call.request, upstream, response, names, key, route, outcome, deadline)


def _response(
    upstream: Response,
    key: bytes,
    mask: bytes,
    decoded: bool,
    at_once: bool,
    rewrite: links.Rewrite | None = None,
) -> RawHeadResponse:
    """The client's response, carrying the upstream's header lines byte for byte, less
    the hop-by-hop ones, the framing, CORS, any named by the key and, when the body is
    decoded, its coding. The key is masked in values and in the reason phrase."""
    lines = bytearray()
    count = 0
    for name, value in upstream.headers:
        lower = name.lower()
        # The proxy answers CORS itself, for its own allowed origins; the upstream's
        # (say `Access-Control-Allow-Origin: *`) would contradict or widen that.
        if lower in _NOT_RELAYED or lower.startswith(b"access-control-"):
            continue
        if (decoded and lower == b"content-encoding") or name.find(key) >= 0:
            continue  # a name cannot be masked into anything the client could use
        if rewrite is not None and lower == b"location":
            value = rewrite.location(value.decode("latin-1")).encode("latin-1")
        lines += b"%s: %s\r\n" % (name, value.replace(key, mask))  # replace(): see relay()
        count += 1
    reason = upstream.reason.replace(key, mask)
    try:
        return RawHeadResponse(upstream.status, reason, lines, count, at_once=at_once)
    except UnsafeHead as exc:
        raise ProtocolError(f"upstream answer unsafe to relay: {exc}") from None


async def _send(
    request: web.BaseRequest, response: web.StreamResponse, body: bytes, outcome: Outcome
) -> web.StreamResponse:
    """A whole body in one write, with its length (relay() does the same inline)."""
    response.content_length = len(body)
    if outcome.response_prefix is not None:
        outcome.response_prefix = body
    try:
        await response.prepare(request)
        outcome.sent = True
        await response.write_eof(body)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        outcome.broken = True
    return response


async def _relay_stream(
    request: web.BaseRequest,
    upstream: Response,
    response: web.StreamResponse,
    scrubber: Scrubber | None,
    outcome: Outcome,
    deadline: Deadline,
    idle: float,
) -> web.StreamResponse:
    limit = EVENT_STREAM_CAPTURE if upstream.content_type == "text/event-stream" else CAPTURE_LIMIT
    pieces = upstream.iter_any()
    return await _stream_on(request, b"", pieces, response, scrubber, outcome, deadline, idle, limit)


async def _relay_decoding(
    request: web.BaseRequest,
    upstream: Response,
    response: web.StreamResponse,
    names: Sequence[str],
    key: bytes,
    route: Route,
    outcome: Outcome,
    deadline: Deadline,
) -> web.StreamResponse:
    """A coded success answer, streamed decoded. Its first decoded bytes are in hand before
    the status line goes out, so a body that is not what it says is a clean 502; one that
    goes bad later is cut."""
    idle = route.idle_timeout
    scrubber = Scrubber(key, route.mask)
    prefix = outcome.response_prefix
    pieces = decoded.pieces(upstream, names, deadline, idle)
    async with contextlib.aclosing(pieces):
        try:
            first = await anext(pieces, b"")
        except Undecodable:
            raise Unrelayable(UNDECODABLE) from None
        try:
            await response.prepare(request)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            outcome.broken = True
            return response
        outcome.sent = True
        try:
            out = scrubber.feed(first)
            while True:
                if prefix is not None and len(prefix) < CAPTURE_LIMIT:
                    prefix += out[: CAPTURE_LIMIT - len(prefix)]
                if out:
                    await response.write(out)
                    deadline.extend(idle)
                piece = await anext(pieces, None)
                if piece is None:
                    break
                out = scrubber.feed(piece)
            rest = scrubber.finish()
            if rest:
                await response.write(rest)
            await response.write_eof()
        except Undecodable:
            raise Unrelayable(UNDECODABLE) from None  # after the status: the client is cut
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            outcome.broken = True
    return response


async def _relay_gathered(
    request: web.BaseRequest,
    pieces: AsyncIterator[bytes],
    response: web.StreamResponse,
    rewrite: links.Rewrite,
    scrubber: Scrubber | None,
    outcome: Outcome,
    deadline: Deadline,
    route: Route,
) -> web.StreamResponse:
    """A JSON success answer on a prediction path: read up to `links.MAX_BODY` (decoded,
    when `pieces` decode), then sent whole with its links moved; or, past the bound,
    streamed on as it comes with its links as they are. Nothing is sent before the
    bound or the end, so an undecodable body found by then is a clean 502."""
    idle = route.idle_timeout
    held = bytearray()
    try:
        async for piece in pieces:
            deadline.extend(idle)
            held += piece
            if len(held) > links.MAX_BODY:
                break
        else:
            body = rewrite.body(bytes(held))
            if scrubber is not None:
                body = scrubber.feed(body) + scrubber.finish()
            return await _send(request, response, body, outcome)
        return await _stream_on(request, bytes(held), pieces, response, scrubber, outcome, deadline, idle)
    except Undecodable:
        raise Unrelayable(UNDECODABLE) from None  # after the status, if sent: the client is cut
    finally:
        if isinstance(pieces, AsyncGenerator):  # decoding's generator ends with the relay
            await pieces.aclose()


async def _stream_on(
    request: web.BaseRequest,
    first: bytes,
    pieces: AsyncIterator[bytes],
    response: web.StreamResponse,
    scrubber: Scrubber | None,
    outcome: Outcome,
    deadline: Deadline,
    idle: float,
    limit: int = CAPTURE_LIMIT,
) -> web.StreamResponse:
    """`first`, then the rest of `pieces`, streamed and searched as they come; the audit
    keeps up to `limit` bytes of it."""
    try:
        await response.prepare(request)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        outcome.broken = True
        return response
    outcome.sent = True
    prefix = outcome.response_prefix
    piece: bytes | None = first
    try:
        while piece is not None:
            out = scrubber.feed(piece) if scrubber is not None else piece
            if prefix is not None and len(prefix) < limit:
                prefix += out[: limit - len(prefix)]
            if out:
                await response.write(out)
                deadline.extend(idle)
            piece = await anext(pieces, None)
            deadline.extend(idle)
        rest = scrubber.finish() if scrubber is not None else b""
        if rest:
            await response.write(rest)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        outcome.broken = True
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
