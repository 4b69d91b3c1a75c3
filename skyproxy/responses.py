"""The one JSON error shape every client error uses."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str,
    *,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, object] | None = None,
) -> web.Response:
    error: dict[str, object] = {"code": code, "message": message, "request_id": request_id}
    if extra:
        error.update(extra)
    body = json.dumps({"error": error}, separators=(",", ":"))
    response = web.Response(status=status, text=body, content_type="application/json", headers=headers)
    response.headers["X-Request-Id"] = request_id
    return response
