"""The scrubber: the key replaced wherever the chunks of a stream split it, and nothing more held back."""

from __future__ import annotations

import random

import pytest
from helpers import CANARY

from skyproxy.keys.secret import fingerprint
from skyproxy.proxy.scrub import Scrubber, mask_of

FINGERPRINT = fingerprint(CANARY)


@pytest.mark.parametrize("size", [1, 2, 5, 17])
def test_scrubber_finds_the_key_split_at_every_point(size):
    needle, replacement = CANARY.encode(), FINGERPRINT.encode()
    text = b"<" + needle + b"|" + needle + needle + b">" + needle[:-1] + b"!"
    scrubber = Scrubber(needle, replacement)
    out = b"".join(scrubber.feed(text[i : i + size]) for i in range(0, len(text), size))
    out += scrubber.finish()
    assert out == text.replace(needle, replacement)
    for cut in range(1, len(text)):
        scrubber = Scrubber(needle, replacement)
        out = scrubber.feed(text[:cut]) + scrubber.feed(text[cut:]) + scrubber.finish()
        assert out == text.replace(needle, replacement), cut


def test_a_chunk_goes_out_whole_unless_its_end_could_start_the_key():
    needle = CANARY.encode()
    scrubber = Scrubber(needle, mask_of(CANARY, FINGERPRINT).encode())
    event = b'data: {"delta": "sk"}\n\n'
    assert scrubber.feed(event) == event  # an event is never held for the next one
    assert scrubber.feed(b"prefix " + needle[:9]) == b"prefix "
    assert scrubber.feed(needle[9:] + b" after") == mask_of(CANARY, FINGERPRINT).encode() + b" after"
    assert scrubber.feed(b"ends in s") == b"ends in "
    assert scrubber.feed(b"o") == b"so"
    assert scrubber.finish() == b""
    assert scrubber.found == 1


def test_random_chunks_of_key_fragments_never_let_the_key_through():
    needle = CANARY.encode()
    mask = mask_of(CANARY, FINGERPRINT).encode()
    rng = random.Random(10)
    for _ in range(300):
        parts = [rng.choice([needle, needle[: rng.randrange(1, len(needle))], b"s", b"sk-", b"x\n"])]
        parts += [
            rng.choice([needle, needle[rng.randrange(len(needle)) :], b"sk-canary", b"."]) for _ in range(6)
        ]
        text = b"".join(parts)
        scrubber = Scrubber(needle, mask)
        out = bytearray()
        at = 0
        while at < len(text):
            step = rng.randrange(1, 40)
            out += scrubber.feed(text[at : at + step])
            at += step
        out += scrubber.finish()
        assert bytes(out) == text.replace(needle, mask)
        assert needle not in out


def test_the_mask_has_the_key_s_length_and_shows_the_fingerprint():
    mask = mask_of(CANARY, FINGERPRINT)
    assert len(mask) == len(CANARY)
    assert mask == "*" + FINGERPRINT + "*" * (len(CANARY) - len(FINGERPRINT) - 1)
    assert mask_of("sk-short", fingerprint("sk-short")) == "********"
    assert mask_of("sk-*-star", "fp") == "#fp######"


def test_a_mask_never_joins_its_neighbours_into_the_key():
    needle = CANARY.encode()
    mask = mask_of(CANARY, FINGERPRINT).encode()
    for cut in range(len(needle)):
        text = needle[:cut] + needle + needle[cut:]
        scrubber = Scrubber(needle, mask)
        out = scrubber.feed(text) + scrubber.finish()
        assert needle not in out, cut
