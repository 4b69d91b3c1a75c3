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

from typing import Any

import orjson

MAX_BODY = 1_048_576  # larger answers pass unchanged
PREDICTIONS = "/v1/predictions"  # the prediction paths: this one and every path under it,
PREDICT = "/v1/predict"  # and this one
_FORMS = ((b'"urls":{', b':"'), (b'"urls": {', b': "'))  # compact, then with a space
_KEPT = 256  # rewrites remembered, one per upstream and Host header


class Rewrite:
    """Moves links from one upstream to the proxy as one Host header names it."""

    __slots__ = ("_forms", "_origin", "proxy", "upstream")

    def __init__(self, upstream: str, proxy: str) -> None:
        self.upstream = upstream
        self.proxy = proxy
        self._origin = upstream.encode()
        # None when the proxy origin would need escaping in a JSON string: the parse
        # writes it correctly.
        safe = proxy.isprintable() and '"' not in proxy and "\\" not in proxy
        self._forms = (
            tuple((key, sep + self._origin + b"/", sep + proxy.encode() + b"/") for key, sep in _FORMS)
            if safe
            else None
        )

    def location(self, value: str) -> str:
        upstream = self.upstream
        return self.proxy + value[len(upstream) :] if _names(value, upstream) else value

    def body(self, body: bytes) -> bytes:
        """The answer with every upstream `urls.*` value moved; unchanged if none."""
        if len(body) > MAX_BODY:
            return body
        mentions = body.count(self._origin)
        if not mentions:
            return body
        forms = self._forms
        if forms is not None and body.startswith(b"{") and body.endswith(b"}"):
            for key, theirs, ours in forms:
                at = body.find(key)
                if at != -1:
                    if body.count(theirs, at, body.find(b"}", at)) == mentions:
                        return body.replace(theirs, ours)
                    break
        return _rewrite_parsed(body, self.upstream, self.proxy)


_rewrites: dict[tuple[str, str], Rewrite] = {}


def rewrite_for(upstream: str, host: str) -> Rewrite:
    """The rewrite for answers from `upstream` to a client that sent `host`."""
    found = _rewrites.get((upstream, host))
    if found is None:
        if len(_rewrites) >= _KEPT:
            _rewrites.clear()  # Host headers are the client's: the memory stays bounded
        found = _rewrites[(upstream, host)] = Rewrite(upstream, "http://" + host)
    return found


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
