"""Replacing the key in a streamed body, so an upstream error that echoes it shows the fingerprint."""

from __future__ import annotations


class Scrubber:
    """Replaces a needle in a stream, including occurrences split across chunks."""

    __slots__ = ("_carry", "_keep", "_needle", "_replacement")

    def __init__(self, needle: bytes, replacement: bytes) -> None:
        self._needle = needle
        self._replacement = replacement
        self._keep = max(len(needle) - 1, 0)
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        data = (self._carry + chunk).replace(self._needle, self._replacement)
        if len(data) <= self._keep:
            self._carry = data
            return b""
        cut = len(data) - self._keep
        self._carry = data[cut:]
        return data[:cut]

    def finish(self) -> bytes:
        rest, self._carry = self._carry, b""
        return rest
