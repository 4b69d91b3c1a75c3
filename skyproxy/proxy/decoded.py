"""Coded answers: decoded, so the key can be looked for in them, and never relayed as they came.

The upstream is asked for identity (headers.py), so a coded answer means an upstream that
ignored that. An error answer is decoded whole, up to `ERROR_LIMIT`, before anything is
sent: a body that is not what its Content-Encoding says, or that decodes beyond the
bound, is a clean 502. A success answer streams, decoded piece by piece.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from typing import Protocol

from skyproxy.codings import Decoding, Undecodable
from skyproxy.proxy.deadlines import Deadline
from skyproxy.proxy.exchange import Failure

# Error answers worth reading are a few KiB: this leaves room for an HTML error page
# while a gzip bomb costs the proxy no more than this per exchange.
ERROR_LIMIT = 4 * 1024 * 1024

UNDECODABLE = Failure(
    502, "upstream_undecodable", "Upstream answered in a content coding the proxy cannot inspect."
)
TOO_LARGE = Failure(
    502, "upstream_too_large", f"Upstream's error answer decodes to more than {ERROR_LIMIT} bytes."
)


class Unrelayable(Exception):
    """The answer cannot be passed on; raised before anything of it was sent."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.code)
        self.failure = failure


class Source(Protocol):
    def iter_any(self) -> AsyncIterator[bytes]: ...


async def pieces(
    body: Source, names: Sequence[str], deadline: Deadline, idle: float
) -> AsyncGenerator[bytes, None]:
    """The body decoded, in pieces of bounded size; raises Undecodable. Each piece that
    arrives moves the deadline on."""
    decoding = Decoding(names)
    async for chunk in body.iter_any():
        deadline.extend(idle)
        for piece in decoding.feed(chunk):
            yield piece
    decoding.end()


async def whole(body: Source, names: Sequence[str], deadline: Deadline, idle: float) -> bytes:
    """The whole body decoded, or Unrelayable: undecodable, or larger than ERROR_LIMIT."""
    plain = bytearray()
    try:
        async with aclosing(pieces(body, names, deadline, idle)) as decoded:
            async for piece in decoded:
                plain += piece
                if len(plain) > ERROR_LIMIT:
                    raise Unrelayable(TOO_LARGE)  # the rest is never decoded, nor read
    except Undecodable:
        raise Unrelayable(UNDECODABLE) from None
    return bytes(plain)
