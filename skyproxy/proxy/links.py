"""Links that come back through the proxy: `urls.*` and `Location` naming the upstream.

A prediction's `urls.get`, `urls.cancel`, `urls.stream` and `urls.delete` point at the
upstream, where an app would need the key. On prediction paths they are rewritten to the
proxy's own origin as the client reached it. Answers that do not mention the upstream's
origin pass as they are, and so do bodies that are not JSON or are over 1 MiB.

Every create and every poll carries these links, so the common answer is rewritten in
place, without a parse: a body that starts with `{` and ends with `}`, whose first
`urls` object, written compactly or with a space after each colon, holds every mention
of the upstream, each at the start of a value and followed by a slash. Replacing those
bytes then changes what parsing, editing and re-serialising would, and leaves every
other byte as the upstream sent it. Such a body is trusted to be the JSON it looks like.
Any other answer (a list of predictions, the upstream's origin elsewhere in the body, a
link without a path, a proxy origin that would need escaping) is parsed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson

MAX_BODY = 1_048_576  # larger answers pass unchanged
PREDICTIONS = "/v1/predictions"  # the prediction paths: this one and every path under it,
PREDICT = "/v1/predict"  # and this one
_FORMS = ((b'"urls":{', b':"'), (b'"urls": {', b': "'))  # compact, then with a space


def rewrite_location(value: str, upstream: str, proxy: str) -> str:
    return proxy + value[len(upstream) :] if _names(value, upstream) else value


def rewrite_body(body: bytes, upstream: str, proxy: str) -> bytes:
    """The answer with every upstream `urls.*` value moved to `proxy`; unchanged if none."""
    if len(body) > MAX_BODY:
        return body
    origin, forms = _needles(upstream, proxy)
    mentions = body.count(origin)
    if not mentions:
        return body
    if body.startswith(b"{") and body.endswith(b"}"):
        for key, theirs, ours in forms:
            at = body.find(key)
            if at != -1:
                if body.count(theirs, at, body.find(b"}", at)) == mentions:
                    return body.replace(theirs, ours)
                break
    return _rewrite_parsed(body, upstream, proxy)


@lru_cache(maxsize=256)
def _needles(upstream: str, proxy: str) -> tuple[bytes, tuple[tuple[bytes, bytes, bytes], ...]]:
    """The upstream's origin; per form, the `urls` key, a value naming the upstream, ours.

    No form when the proxy origin (the client's Host header) would need escaping in a
    JSON string: the parse writes it correctly."""
    origin = upstream.encode()
    if not proxy.isprintable() or '"' in proxy or "\\" in proxy:
        return origin, ()
    ours = proxy.encode()
    return origin, tuple((key, sep + origin + b"/", sep + ours + b"/") for key, sep in _FORMS)


def _rewrite_parsed(body: bytes, upstream: str, proxy: str) -> bytes:
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
