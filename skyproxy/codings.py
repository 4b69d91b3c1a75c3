"""The content codings the proxy undoes: gzip, deflate and br, alone or stacked.

The relay decodes any coded answer so that it can look for the key in it, and the audit
decodes an answer to read its fields: both ask here, so both undo exactly the same codings.
Decoding is incremental and bounded: each step yields at most about `STEP` bytes, so a
small body that decodes to gigabytes never sits in memory whole. A coded create that asks
for a webhook is decoded, rewritten and coded again (`encode`) in the same codings.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator, Sequence
from typing import Protocol

import brotli

STEP = 65_536  # decoded bytes handed out at a time

# Coding names are case-insensitive (RFC 9110 8.4.1); x-gzip is gzip's old alias.
_GZIP = frozenset(("gzip", "x-gzip"))
_DEFLATE = "deflate"
_BROTLI = "br"
DECODABLE = _GZIP | {_DEFLATE, _BROTLI}


class Undecodable(Exception):
    """The body is not what its Content-Encoding says: corrupt, truncated, or followed by junk."""


class TooLarge(Exception):
    """The body decodes to more than the bound it was decoded under."""


def parse(header: str | None) -> tuple[str, ...] | None:
    """The codings a Content-Encoding value lists, in the order they were applied, lower
    case, without `identity`. None when one of them is not a coding we undo."""
    if not header:
        return ()
    names = tuple(name.strip().lower() for name in header.split(","))
    names = tuple(name for name in names if name and name != "identity")
    return names if all(name in DECODABLE for name in names) else None


class _Stage(Protocol):
    def feed(self, data: bytes) -> Iterator[bytes]: ...

    def end(self) -> None: ...


class Decoding:
    """A body's codings undone, the last applied first, as its pieces arrive."""

    __slots__ = ("_stages",)

    def __init__(self, names: Sequence[str]) -> None:
        self._stages = [_stage(name) for name in reversed(names)]

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded pieces `data` gives; raises Undecodable."""
        return self._through(0, data)

    def end(self) -> None:
        """Raises Undecodable when the body stopped inside a coded stream."""
        for stage in self._stages:
            stage.end()

    def _through(self, index: int, data: bytes) -> Iterator[bytes]:
        if index == len(self._stages):
            yield data
            return
        for piece in self._stages[index].feed(data):
            yield from self._through(index + 1, piece)


def _stage(name: str) -> _Stage:
    if name in _GZIP:
        return _Zlib(gzip=True)
    if name == _DEFLATE:
        return _Zlib(gzip=False)
    if name == _BROTLI:
        return _Brotli()
    raise ValueError(f"not a coding we undo: {name!r}")


def _zlib_header(first: bytes) -> bool:
    """RFC 1950's two-byte header: deflate with a window, and a check that divides by 31."""
    cmf, flg = first[0], first[1]
    return cmf & 0x0F == 8 and cmf >> 4 <= 7 and ((cmf << 8) | flg) % 31 == 0


class _Zlib:
    """gzip (members one after another, as gzip itself allows), or deflate with or without
    its zlib header: servers send both under `deflate`, and browsers accept both."""

    __slots__ = ("_decoder", "_gzip", "_start")

    def __init__(self, gzip: bool) -> None:
        self._gzip = gzip
        self._start = b""  # deflate's first bytes, until there are two to tell the header by
        self._decoder: zlib._Decompress | None = (
            zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if gzip else None
        )

    def feed(self, data: bytes) -> Iterator[bytes]:
        decoder = self._decoder
        if decoder is None:
            data = self._start + data
            if len(data) < 2:
                self._start = data
                return
            self._start = b""
            wbits = zlib.MAX_WBITS if _zlib_header(data) else -zlib.MAX_WBITS
            decoder = self._decoder = zlib.decompressobj(wbits=wbits)
        try:
            while data or decoder.unconsumed_tail:
                if decoder.eof:
                    if not self._gzip:
                        raise Undecodable("data after the end of a deflate stream")
                    decoder = self._decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                out = decoder.decompress(data or decoder.unconsumed_tail, STEP)
                data = b""
                if decoder.eof:
                    data = decoder.unused_data  # the next gzip member, if any
                if out:
                    yield out
                while len(out) == STEP and not decoder.unconsumed_tail and not decoder.eof:
                    out = decoder.decompress(b"", STEP)  # output zlib still holds
                    if out:
                        yield out
        except zlib.error as exc:
            raise Undecodable(str(exc)) from None

    def end(self) -> None:
        decoder = self._decoder
        if self._start or (decoder is not None and not decoder.eof):
            raise Undecodable("the body ends inside a coded stream")


class _Brotli:
    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = brotli.Decompressor()

    def feed(self, data: bytes) -> Iterator[bytes]:
        decoder = self._decoder
        try:
            if decoder.is_finished():
                if data:
                    raise Undecodable("data after the end of a br stream")
                return
            out = decoder.process(data, output_buffer_limit=STEP)
            if out:
                yield out
            while not decoder.can_accept_more_data():
                out = decoder.process(b"", output_buffer_limit=STEP)
                if out:
                    yield out
        except brotli.error as exc:
            raise Undecodable(str(exc)) from None

    def end(self) -> None:
        if not self._decoder.is_finished():
            raise Undecodable("the body ends inside a br stream")


def decode(data: bytes | bytearray, coding: str | None, limit: int) -> bytes | bytearray | None:
    """A whole body decoded, or None when its coding is not one we undo, or it is truncated,
    corrupt or decodes to more than `limit` bytes."""
    names = parse(coding)
    if names is None:
        return None
    if not names:
        return data
    try:
        return decode_within(data, names, limit)
    except (Undecodable, TooLarge):
        return None


def decode_within(data: bytes | bytearray, names: Sequence[str], limit: int) -> bytes:
    """A whole body in the codings `names` (as parse() gives them) decoded; raises
    Undecodable, or TooLarge as soon as more than `limit` bytes have come out."""
    decoding = Decoding(names)
    plain = bytearray()
    for piece in decoding.feed(bytes(data)):
        plain += piece
        if len(plain) > limit:
            raise TooLarge
    decoding.end()
    return bytes(plain)


def encode(data: bytes, names: Sequence[str]) -> bytes:
    """`data` coded in `names`, applied in the order given (as parse() gives them)."""
    for name in names:
        if name in _GZIP:
            data = gzip.compress(data, mtime=0)
        elif name == _DEFLATE:
            data = zlib.compress(data)
        elif name == _BROTLI:
            data = brotli.compress(data)
        else:
            raise ValueError(f"not a coding we undo: {name!r}")
    return data
