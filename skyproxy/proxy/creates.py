"""Creates that may ask for a webhook, while [webhooks] is on: read whole, then rewritten.

The body is read before the exchange (within max_body_bytes) so that the webhook URL can
be checked against `allowed_targets` and replaced by a route of the receiver before the
upstream is contacted. Without [webhooks] no create comes here.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web
from aiohttp.http import HttpVersion11

from skyproxy.cluster.errors import ClusterUnavailable
from skyproxy.proxy import body
from skyproxy.proxy.deadlines import Deadline
from skyproxy.proxy.responses import error_response
from skyproxy.webhooks.routes import MARKER, RouteBook, TargetNotAllowed

CREATE_PATHS = frozenset({"/v1/predictions", "/v1/predict"})


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
    if not read or read.find(MARKER) < 0:
        return read or b""  # no webhook asked for: the bytes as they came, at no more cost
    return await _rewritten(read, book, environment, user, request_id, reply)


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
