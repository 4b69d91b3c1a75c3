"""Links that come back through the proxy: `urls.*` and `Location` naming the upstream.

A prediction's `urls.get`, `urls.cancel`, `urls.stream` and `urls.delete` point at the
upstream, where an app would need the key. On prediction paths they are rewritten to the
proxy's own origin as the client reached it. Only small JSON answers that contain the
upstream's origin at all are parsed; the rest pass as they are.
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_BODY = 1_048_576  # larger answers pass unchanged


def is_prediction_path(path: str) -> bool:
    return path.startswith("/v1/predictions") or path == "/v1/predict"


def rewrite_location(value: str, upstream: str, proxy: str) -> str:
    return proxy + value[len(upstream) :] if _names(value, upstream) else value


def rewrite_body(body: bytes, upstream: str, proxy: str) -> bytes:
    """The answer with every upstream `urls.*` value moved to `proxy`; unchanged if none."""
    if len(body) > MAX_BODY or upstream.encode() not in body:
        return body
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    items: list[Any]
    if isinstance(document, list):
        items = document
    elif isinstance(document, dict) and isinstance(document.get("data"), list):
        items = [document, *document["data"]]
    else:
        items = [document]
    changed = False
    for item in items:
        urls = item.get("urls") if isinstance(item, dict) else None
        if not isinstance(urls, dict):
            continue
        for name, value in urls.items():
            if isinstance(value, str) and _names(value, upstream):
                urls[name] = proxy + value[len(upstream) :]
                changed = True
    return orjson.dumps(document) if changed else body


def _names(value: str, upstream: str) -> bool:
    return value.startswith(upstream) and (len(value) == len(upstream) or value[len(upstream)] in "/?#")
