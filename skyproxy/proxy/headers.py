"""The header lines that go upstream, and which ones never travel either way.

The outbound head is built from the client's raw header lines, byte for byte, less the
hop-by-hop ones (RFC 9110 7.6.1), the client's own credentials and the framing, which
the upstream client writes itself. The environment's key goes on in their place.

The upstream is asked for identity bodies whatever the client accepts: the relay looks
for the key in every body, and in an identity body that is one search of the bytes as
they pass, while a coded body must be decoded first (several times the search's cost
on a small JSON answer). A body coded anyway is decoded, searched and relayed decoded.
"""

from __future__ import annotations

_DROP_REQUEST = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"x-api-key",
        b"authorization",
        b"cookie",
        b"accept-encoding",
        b"x-request-id",
        b"content-length",
        b"expect",
    )
)
# Lower case. The upstream's cookies and request id are not the client's business; CORS
# headers are dropped apart (see the relay), since they are a prefix, not a list.
DROP_RESPONSE = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"set-cookie",
        b"x-request-id",
    )
)
RawHeaders = tuple[tuple[bytes, bytes], ...]


def outbound_head(raw: RawHeaders, key: bytes, request_id: str, user_header: bytes) -> bytes:
    """The header lines sent upstream, byte for byte as the client sent them, less the
    dropped ones. `user_header` is lower case."""
    # Lines joined once at the end: a `%` format or a bytearray append per line costs
    # several times as much, on every request.
    lines: list[bytes] = []
    lowers: list[bytes] = []
    named: list[bytes] = []  # the values of Connection headers: rare, and then filtered after
    for name, value in raw:
        lower = name.lower()
        if lower in _DROP_REQUEST or lower == user_header:
            if lower == b"connection":
                named.append(value)
            continue
        lines.append(name + b": " + value)
        lowers.append(lower)
    if named:
        hop = _connection_tokens(named)
        lines = [line for line, lower in zip(lines, lowers, strict=True) if lower not in hop]
    lines += (
        b"Accept-Encoding: identity",
        b"x-api-key: " + key,
        b"X-Request-Id: " + request_id.encode(),
        b"",  # the last line's end
    )
    return b"\r\n".join(lines)


def _connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    """The headers the client's Connection headers name: hop-by-hop by declaration."""
    return frozenset(t.strip().lower() for value in values for t in value.split(b",") if t.strip())
