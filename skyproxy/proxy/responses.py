"""The one JSON error shape every client error uses."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from random import getrandbits

from aiohttp import web

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


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


def request_id_of(headers: Mapping[str, str]) -> str:
    given = headers.get("X-Request-Id")
    if given and _SANE_REQUEST_ID.fullmatch(given):
        return given
    # 96 random bits without a syscall per request, and no sequence for a client to read
    # the proxy's request volume from.
    return getrandbits(96).to_bytes(12, "big").hex()  # 24 hex digits; cheaper than a format spec
