"""The content codings the proxy undoes: names, stacks, pieces, bounds, and what is refused."""

from __future__ import annotations

import gzip
import itertools
import zlib
from collections.abc import Iterable

import brotli
import pytest

from skyproxy import codings
from skyproxy.codings import Decoding, Undecodable

PLAIN = b'{"id":"pred_1","status":"succeeded","output":"' + b"x" * 5000 + b'"}'


def raw_deflate(data: bytes) -> bytes:
    coder = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return coder.compress(data) + coder.flush()


CODERS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": lambda data: brotli.compress(data, quality=5),
}


def encode(data: bytes, names: Iterable[str]) -> bytes:
    for name in names:
        data = CODERS[name.strip().lower().removeprefix("x-")](data)
    return data


def decode_in_pieces(names: tuple[str, ...], coded: bytes, size: int) -> bytes:
    decoding = Decoding(names)
    out = b"".join(piece for i in range(0, len(coded), size) for piece in decoding.feed(coded[i : i + size]))
    decoding.end()
    return out


@pytest.mark.parametrize(
    ("header", "names"),
    [
        (None, ()),
        ("", ()),
        ("identity", ()),
        ("gzip", ("gzip",)),
        ("GZIP", ("gzip",)),
        (" X-Gzip ", ("x-gzip",)),
        ("Deflate", ("deflate",)),
        ("BR", ("br",)),
        ("gzip, gzip", ("gzip", "gzip")),
        ("deflate,br", ("deflate", "br")),
        ("identity, gzip", ("gzip",)),
        ("compress", None),
        ("zstd", None),
        ("gzip, zstd", None),
        ("gzip;q=1", None),
    ],
)
def test_coding_names_are_parsed_case_insensitively_in_order(header, names) -> None:
    assert codings.parse(header) == names


@pytest.mark.parametrize(
    "header", ["gzip", "x-gzip", "GZIP", "deflate", "br", "Br", "gzip, gzip", "deflate, br, gzip"]
)
@pytest.mark.parametrize("size", [1, 7, 100_000])
def test_every_coding_and_stack_decodes_in_any_pieces(header: str, size: int) -> None:
    names = codings.parse(header)
    assert names
    assert decode_in_pieces(names, encode(PLAIN, header.split(",")), size) == PLAIN


@pytest.mark.parametrize("size", [1, 2, 3, 100_000])
def test_deflate_is_read_with_or_without_its_zlib_header(size: int) -> None:
    assert decode_in_pieces(("deflate",), raw_deflate(PLAIN), size) == PLAIN
    assert decode_in_pieces(("deflate",), zlib.compress(PLAIN), size) == PLAIN


def test_gzip_members_one_after_another_decode_as_one_body() -> None:
    coded = gzip.compress(PLAIN[:100]) + gzip.compress(PLAIN[100:])
    assert decode_in_pieces(("gzip",), coded, 9) == PLAIN


@pytest.mark.parametrize(
    ("header", "coded"),
    [
        ("gzip", PLAIN),  # mislabelled: plain text called gzip
        ("br", PLAIN),
        ("gzip", zlib.compress(PLAIN)),  # deflate called gzip
        ("gzip", gzip.compress(PLAIN)[:-20]),  # truncated
        ("deflate", zlib.compress(PLAIN)[:-9]),
        ("br", brotli.compress(PLAIN)[:-3]),
        ("deflate", zlib.compress(PLAIN) + b"junk"),  # data after the end
        ("br", brotli.compress(PLAIN) + b"junk"),
        ("gzip", gzip.compress(PLAIN) + b"junk-not-a-member"),
        ("gzip, gzip", gzip.compress(PLAIN)),  # one layer fewer than it says
        ("deflate", b"x"),  # too short to tell
    ],
)
@pytest.mark.parametrize("size", [1, 100_000])
def test_a_body_that_is_not_what_it_says_is_undecodable(header: str, coded: bytes, size: int) -> None:
    names = codings.parse(header)
    assert names
    with pytest.raises(Undecodable):
        decode_in_pieces(names, coded, size)
    assert codings.decode(coded, header, 10 * len(PLAIN)) is None


@pytest.mark.parametrize("header", ["gzip", "deflate", "br", "gzip, gzip"])
def test_a_bomb_comes_out_in_bounded_pieces(header: str) -> None:
    coded = encode(b"\0" * 64_000_000, header.split(","))
    assert len(coded) < 200_000
    decoding = Decoding(codings.parse(header) or ())
    pieces = decoding.feed(coded)
    # The first 4 MiB take a few pieces, none of them large, and nothing decodes ahead.
    taken = list(itertools.islice(pieces, 64))
    assert sum(map(len, taken)) >= 4 * 2**20
    assert max(map(len, taken)) <= 2 * codings.STEP


def test_whole_body_decode_keeps_to_its_limit() -> None:
    coded = gzip.compress(PLAIN)
    assert codings.decode(coded, "gzip", len(PLAIN)) == PLAIN
    assert codings.decode(bytearray(coded), "GZIP", len(PLAIN)) == PLAIN
    assert codings.decode(coded, "gzip", len(PLAIN) - 1) is None
    bomb = gzip.compress(b"\0" * 50_000_000)
    assert codings.decode(bomb, "gzip", 65_536) is None


def test_whole_body_decode_of_identity_and_unknown_codings() -> None:
    assert codings.decode(b"as sent", None, 100) == b"as sent"
    assert codings.decode(b"as sent", "identity", 100) == b"as sent"
    assert codings.decode(b"as sent", "zstd", 100) is None  # cannot be read, so not read


def test_decodable_names_what_parse_accepts() -> None:
    assert {"gzip", "x-gzip", "deflate", "br"} == codings.DECODABLE
    assert all(codings.parse(name) == (name,) for name in codings.DECODABLE)


@pytest.mark.parametrize("header", ["gzip", "x-gzip", "deflate", "br", "gzip, br", "deflate, gzip"])
def test_encode_is_what_decode_undoes(header: str) -> None:
    names = codings.parse(header)
    assert names
    coded = codings.encode(PLAIN, names)
    assert coded != PLAIN
    assert codings.decode_within(coded, names, len(PLAIN)) == PLAIN
    assert codings.decode_within(encode(PLAIN, names), names, len(PLAIN)) == PLAIN  # others' coders


def test_decode_within_says_why_it_stopped() -> None:
    with pytest.raises(codings.TooLarge):
        codings.decode_within(gzip.compress(b"\0" * 50_000_000), ("gzip",), 65_536)
    with pytest.raises(Undecodable):
        codings.decode_within(b"not gzip", ("gzip",), 65_536)
    with pytest.raises(Undecodable):
        codings.decode_within(gzip.compress(PLAIN)[:-4], ("gzip",), 65_536)
