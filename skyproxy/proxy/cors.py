"""CORS, answered by the proxy itself for the origins it allows.

The guard decides whether an Origin is allowed; this gives an allowed one its headers
and answers its preflights. The upstream's own CORS headers are never relayed (see the
relay): they would contradict or widen these.
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict

from skyproxy.proxy.responses import error_response

_PREFLIGHT_METHODS = "GET, POST, DELETE, OPTIONS"
_PREFLIGHT_MAX_AGE = "600"  # seconds a browser may reuse a preflight's answer


def cors_headers(origin: str) -> CIMultiDict[str]:
    """The headers on every answer to a request from an allowed origin."""
    return CIMultiDict(
        {
            "Access-Control-Allow-Origin": origin,
            "Vary": "Origin",
            "Access-Control-Expose-Headers": "*",
        }
    )


def preflight(request: web.BaseRequest, origin: str | None, request_id: str) -> web.Response:
    """The answer to an OPTIONS preflight; `origin` is None unless it is allowed."""
    if origin is None:
        return error_response(
            403, "origin_not_allowed", "CORS preflight from an origin not allowed.", request_id
        )
    headers = cors_headers(origin)
    headers["Access-Control-Allow-Methods"] = _PREFLIGHT_METHODS
    asked = request.headers.get("Access-Control-Request-Headers")
    if asked:
        headers["Access-Control-Allow-Headers"] = asked
    headers["Access-Control-Max-Age"] = _PREFLIGHT_MAX_AGE
    headers["X-Request-Id"] = request_id
    return web.Response(status=204, headers=headers)
