"""The `Secret` wrapper and key fingerprints.

A key lives in exactly one `Secret`, whose repr and str show only its fingerprint, so an
f-string, a log line or a traceback can never carry key material by accident.
"""

from __future__ import annotations

import hashlib
import secrets


def fingerprint(key: str) -> str:
    """First 8 hex digits of the sha256, two dots, the last 4 characters: `3f2a9c1e..a1b2`."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]
    return f"{digest}..{key[-4:]}"


class Secret:
    """An API key. Only `reveal()` gives the value; everything else shows the fingerprint."""

    __slots__ = ("_value", "fingerprint")

    def __init__(self, value: str) -> None:
        self._value = value
        self.fingerprint = fingerprint(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __reduce__(self) -> str:
        raise TypeError("a Secret cannot be pickled")


def generate_mock_key() -> Secret:
    """A throwaway key for an environment served by the embedded mock."""
    return Secret("sk-mock-" + secrets.token_urlsafe(24))
