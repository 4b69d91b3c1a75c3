"""The content codings the proxy undoes, and one decoder factory for all of them.

The relay decodes an error body to scrub the key from it, and the audit decodes an
answer to read its fields: both ask here, so both undo exactly the same codings.
"""

from __future__ import annotations

import zlib
from typing import Protocol

# Coding names are case-insensitive (RFC 9110 8.4.1); x-gzip is gzip's old alias.
_GZIP = frozenset(("gzip", "x-gzip"))
_DEFLATE = "deflate"
DECODABLE = _GZIP | {_DEFLATE}


class Decoder(Protocol):
    """An incremental decoder, as zlib's decompress objects are."""

    @property
    def eof(self) -> bool: ...

    def decompress(self, data: bytes | bytearray, max_length: int = 0, /) -> bytes: ...

    def flush(self, length: int = ..., /) -> bytes: ...


def decoder(coding: str | None) -> Decoder | None:
    """A fresh decoder for a Content-Encoding value, or None when it is not one we undo."""
    if coding is None:
        return None
    name = coding.strip().lower()
    if name in _GZIP:
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    if name == _DEFLATE:
        return zlib.decompressobj()
    return None


def decode(data: bytes | bytearray, coding: str | None, limit: int) -> bytes | bytearray | None:
    """A whole coded body decoded, or None when it is truncated, corrupt or decodes to more
    than `limit` bytes. A coding we do not undo gives the data back as it is."""
    coded = decoder(coding)
    if coded is None:
        return data
    try:
        plain = coded.decompress(data, limit + 1)  # one byte more tells "over the limit"
    except zlib.error:
        return None
    return plain if coded.eof and len(plain) <= limit else None
