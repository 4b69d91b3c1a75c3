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
from skyproxy.proxy.responses import error_response
from skyproxy.webhooks.routes import RouteBook, TargetNotAllowed

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
) -> bytes | web.Response:
    """The body to forward, or the refusal to answer instead. `read`: the body, when
    admission has read it already (to price the create)."""
    if read is not None:
        return await _rewritten(read, book, environment, user, request_id, reply)
    if not request.body_exists:
        return b""
    if request.version == HttpVersion11 and "Expect" in request.headers:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not started
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            refused = error_response(
                413, "body_too_large", f"Request body exceeds {limit} bytes.", request_id, headers=reply
            )
            refused.force_close()
            return refused
    return await _rewritten(bytes(body), book, environment, user, request_id, reply)


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
