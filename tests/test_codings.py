"""The content codings the proxy undoes: names, streaming decode, and the bounded one-shot decode."""

from __future__ import annotations

import gzip
import zlib

import pytest

from skyproxy import codings

PLAIN = b'{"id":"pred_1","status":"succeeded","output":"' + b"x" * 5000 + b'"}'
CODED = {
    "gzip": gzip.compress(PLAIN),
    "deflate": zlib.compress(PLAIN),
}


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("gzip", "gzip"),
        ("x-gzip", "gzip"),
        ("GZIP", "gzip"),
        (" X-Gzip ", "gzip"),
        ("deflate", "deflate"),
        ("Deflate", "deflate"),
    ],
)
def test_coding_names_are_case_insensitive(name: str, family: str) -> None:
    decoder = codings.decoder(name)
    assert decoder is not None
    assert decoder.decompress(CODED[family]) + decoder.flush() == PLAIN
    assert decoder.eof


@pytest.mark.parametrize("name", [None, "", "identity", "br", "compress", "gzip, br"])
def test_other_codings_are_not_undone(name: str | None) -> None:
    assert codings.decoder(name) is None
    assert codings.decode(b"as sent", name, 100) == b"as sent"


def test_decodable_names_what_the_factory_undoes() -> None:
    assert {"gzip", "x-gzip", "deflate"} == codings.DECODABLE
    assert all(codings.decoder(name) is not None for name in codings.DECODABLE)


def test_a_stream_decodes_in_any_pieces() -> None:
    coded = CODED["gzip"]
    decoder = codings.decoder("gzip")
    assert decoder is not None
    plain = b"".join(decoder.decompress(coded[i : i + 7]) for i in range(0, len(coded), 7))
    assert plain + decoder.flush() == PLAIN


@pytest.mark.parametrize("name", ["gzip", "x-gzip", "deflate"])
def test_decode_gives_the_whole_body(name: str) -> None:
    coded = CODED["deflate" if name == "deflate" else "gzip"]
    assert codings.decode(coded, name, len(PLAIN)) == PLAIN
    assert codings.decode(bytearray(coded), name, len(PLAIN)) == PLAIN


def test_decode_refuses_a_body_over_the_limit() -> None:
    assert codings.decode(CODED["gzip"], "gzip", len(PLAIN) - 1) is None
    bomb = gzip.compress(b"\0" * 50_000_000)  # 50 MB from about 50 KB
    assert codings.decode(bomb, "gzip", 65_536) is None


@pytest.mark.parametrize("name", ["gzip", "deflate"])
def test_decode_refuses_a_truncated_or_corrupt_body(name: str) -> None:
    coded = CODED[name]
    assert codings.decode(coded[: len(coded) // 2], name, len(PLAIN)) is None
    assert codings.decode(b"not coded at all", name, len(PLAIN)) is None
