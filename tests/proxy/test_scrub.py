"""The scrubber: the key replaced by its fingerprint wherever the chunks of a stream split it."""

from __future__ import annotations

import pytest
from helpers import CANARY

from skyproxy.keys.secret import fingerprint
from skyproxy.proxy.scrub import Scrubber

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
