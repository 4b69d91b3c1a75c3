"""Keeping the key out of what the upstream sends back: its mask, and a scrubber for streams."""

from __future__ import annotations

import string

# A key of printable characters leaves at least one of these out, unless it holds every one.
_FILLS = "*#~" + string.punctuation + string.ascii_letters + string.digits


def mask_of(key: str, fingerprint: str) -> str:
    """What stands in for the key: its fingerprint between fill characters, padded with
    them to the key's length (`*3f2a9c1e..a1b2****`), or all fill for a short key.

    Of the same length, so a body whose length was already announced keeps it. The fill
    is a character the key does not hold and the mask starts and ends with it, so a mask
    can never join the bytes around it into the key: `key[:-1] + key` must not scrub
    into the key itself.
    """
    fill = next(c for c in _FILLS if c not in key)
    if len(key) < len(fingerprint) + 2:
        return fill * len(key)
    return fill + fingerprint + fill * (len(key) - len(fingerprint) - 1)


class Scrubber:
    """Replaces a needle in a stream, including occurrences split across chunks.

    Only the end of a chunk that could be the start of the needle is held back until the
    next chunk, so a stream's events are not delayed: a chunk that ends in a newline goes
    out whole.
    """

    __slots__ = ("_first", "_held", "_needle", "_replacement", "found")

    def __init__(self, needle: bytes, replacement: bytes) -> None:
        if not needle:
            raise ValueError("an empty needle")
        self._needle = needle
        self._replacement = replacement
        self._first = needle[:1]
        self._held = b""
        self.found = 0  # occurrences replaced

    def feed(self, chunk: bytes) -> bytes:
        held = self._held
        data = held + chunk if held else chunk
        needle = self._needle
        if needle in data:
            self.found += data.count(needle)
            data = data.replace(needle, self._replacement)
        cut = self._start_of_needle(data)
        self._held = data[cut:]
        return data if cut == len(data) else data[:cut]

    def finish(self) -> bytes:
        rest, self._held = self._held, b""
        return rest

    def _start_of_needle(self, data: bytes) -> int:
        """Where the longest end of `data` that the needle starts with begins; len(data) if none."""
        needle = self._needle
        size = len(data)
        at = data.find(self._first, max(0, size - len(needle) + 1))
        while at != -1:
            if needle.startswith(data[at:]):
                return at
            at = data.find(self._first, at + 1)
        return size
