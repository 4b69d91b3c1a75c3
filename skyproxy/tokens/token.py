"""The token itself: its format, its hash and fingerprint, and a wrapper that hides it.

A token is `skp_` and 43 URL-safe characters: 256 random bits. At that size a plain
SHA-256 is as hard to invert as the token is to guess, so no slow hash or salt is
needed, and a lookup can be one dict access by hash.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

PREFIX = "skp_"
RANDOM_BYTES = 32  # token_urlsafe(32) is 43 characters
MAX_LENGTH = 256  # longer header values are not tokens and are not hashed whole


def digest_of(value: str) -> bytes:
    """The SHA-256 of a presented value, as stored (hex) in the tokens file."""
    # Header values arrive decoded with surrogateescape; encode them back the same way.
    return hashlib.sha256(value[:MAX_LENGTH].encode("utf-8", "surrogateescape")).digest()


def fingerprint_of(digest_hex: str) -> str:
    """What `token list` shows: 12 hex digits of the hash, nothing of the token."""
    return digest_hex[:12]


class ClientToken:
    """A freshly made token. Only `reveal()` gives the value; repr and str show the fingerprint."""

    __slots__ = ("_value", "digest_hex", "fingerprint")

    def __init__(self, value: str) -> None:
        self._value = value
        self.digest_hex = digest_of(value).hex()
        self.fingerprint = fingerprint_of(self.digest_hex)

    @classmethod
    def new(cls) -> ClientToken:
        return cls(PREFIX + secrets.token_urlsafe(RANDOM_BYTES))

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"ClientToken({self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClientToken) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self.digest_hex)

    def __reduce__(self) -> str:
        raise TypeError("a ClientToken cannot be pickled")
