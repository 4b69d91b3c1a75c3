"""Creates that may ask for a webhook, while [webhooks] is on: read whole, then rewritten.

The body is read before the exchange (within max_body_bytes) so that the webhook URL can
be checked against `allowed_targets` and replaced by a route of the receiver before the
upstream is contacted. Without [webhooks] no create comes here.

A body sent with a Content-Encoding is decoded (to at most max_body_bytes) to look for
the webhook; one that asks for a webhook is rewritten and coded again in the same codings,
so the head the app sent still describes it. A coding the proxy cannot undo, or a body
that is not what its coding says, is refused: its webhook can be neither seen nor moved,
and the upstream must never be handed the app's own URL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from skyproxy import codings
from skyproxy.cluster.errors import ClusterUnavailable
from skyproxy.proxy import body
from skyproxy.proxy.deadlines import Deadline, Phase
from skyproxy.proxy.exchange import Call, Route
from skyproxy.proxy.forward import BODY_TIMED_OUT
from skyproxy.proxy.responses import error_response
from skyproxy.webhooks.routes import MARKER, RouteBook, TargetNotAllowed

CREATE_PATHS = frozenset({"/v1/predictions", "/v1/predict"})


async def prepared(
    call: Call, route: Route, book: RouteBook, limit: int, read: bytes | None
) -> bytes | web.Response:
    """prepare() for the handler: a body still arriving is read under a deadline of its
    own (the exchange's is not there yet), moved on by each piece, and a client that goes
    quiet for idle_timeout gets 408. A body that is in already needs none."""
    request = call.request
    user = call.user
    if request.content.is_eof():
        return await prepare(request, book, call.env.name, user, call.request_id, limit, call.reply, read)
    idle = route.idle_timeout
    deadline = route.deadlines.arm(idle, Phase.UPLOAD)  # the sweeper's: no task or timer per create
    try:
        return await prepare(
            request, book, call.env.name, user, call.request_id, limit, call.reply, read, deadline, idle
        )
    except asyncio.CancelledError:
        if not deadline.fired:
            raise
        deadline.absorb()
        failure = BODY_TIMED_OUT
        refused = error_response(
            failure.status, failure.code, failure.message, call.request_id, headers=call.reply
        )
        refused.force_close()
        return refused
    finally:
        deadline.finish()


async def prepare(
    request: web.BaseRequest,
    book: RouteBook,
    environment: str,
    user: str | None,
    request_id: str,
    limit: int,
    reply: Mapping[str, str] | None = None,
    read: bytes | None = None,
    deadline: Deadline | None = None,
    idle: float = 0.0,
) -> bytes | web.Response:
    """The body to forward, or the refusal to answer instead. `read`: the body, when
    admission has read it already (to price the create). `deadline` bounds the reading:
    each piece of a body that streams moves it `idle` seconds on, and it ends with the
    body, so that recording the route is never taken for a client gone quiet."""
    if read is None:
        read = await body.read_whole(request)  # a small body of known length, in one read
    if read is None and request.body_exists:
        streamed = await _read(request, limit, request_id, reply, deadline, idle)
        if isinstance(streamed, web.Response):
            return streamed
        read = streamed
    if deadline is not None:
        deadline.finish()
    if not read:
        return b""
    coding = request.headers.get(hdrs.CONTENT_ENCODING)
    if coding is not None:
        names = codings.parse(coding)
        if names is None:
            message = "A create's body can be read for its webhook only as identity, gzip, deflate or br."
            return error_response(415, "unsupported_content_encoding", message, request_id, headers=reply)
        if names:
            return await _coded(read, names, limit, book, environment, user, request_id, reply)
    if read.find(MARKER) < 0:
        return read  # no webhook asked for: the bytes as they came, at no more cost
    return await _rewritten(read, book, environment, user, request_id, reply)


async def _coded(
    read: bytes,
    names: tuple[str, ...],
    limit: int,
    book: RouteBook,
    environment: str,
    user: str | None,
    request_id: str,
    reply: Mapping[str, str] | None,
) -> bytes | web.Response:
    """A coded body: as it came when it asks for no webhook, else rewritten and coded again.
    Decoding and coding run in a thread: a body of up to max_body_bytes must not hold the loop."""
    try:
        plain = await asyncio.to_thread(codings.decode_within, read, names, limit)
    except codings.Undecodable:
        message = "The create's body is not what its Content-Encoding says."
        return error_response(400, "body_undecodable", message, request_id, headers=reply)
    except codings.TooLarge:
        message = f"Request body exceeds {limit} bytes once decoded."
        return error_response(413, "body_too_large", message, request_id, headers=reply)
    if plain.find(MARKER) < 0:
        return read
    rewritten = await _rewritten(plain, book, environment, user, request_id, reply)
    if isinstance(rewritten, web.Response):
        return rewritten
    if rewritten is plain:
        return read  # unchanged: as it came
    return await asyncio.to_thread(codings.encode, rewritten, names)


async def _read(
    request: web.BaseRequest,
    limit: int,
    request_id: str,
    reply: Mapping[str, str] | None,
    deadline: Deadline | None,
    idle: float,
) -> bytes | web.Response:
    if request.version == HttpVersion11 and "Expect" in request.headers:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not started
    whole = bytearray()
    async for chunk in request.content.iter_any():
        if deadline is not None:
            deadline.extend(idle)
        whole += chunk
        if len(whole) > limit:
            refused = error_response(
                413, "body_too_large", f"Request body exceeds {limit} bytes.", request_id, headers=reply
            )
            refused.force_close()
            return refused
    return bytes(whole)


async def _rewritten(
    body: bytes,
    book: RouteBook,
    environment: str,
    user: str | None,
    request_id: str,
    reply: Mapping[str, str] | None,
) -> bytes | web.Response:
    try:
        return await book.rewrite_create(body, environment, user, request_id)
    except TargetNotAllowed:
        message = "The webhook URL is not in [webhooks] allowed_targets."
        return error_response(400, "webhook_target_not_allowed", message, request_id, headers=reply)
    except (
        ClusterUnavailable
    ):  # the route could not be shared, so another replica could not take its callback
        message = "Webhooks cannot be routed right now. Please retry."
        headers = {**(reply or {}), "Retry-After": "1"}
        return error_response(503, "webhooks_unavailable", message, request_id, headers=headers)
