"""Both signatures: Skytells' on the way in, Standard Webhooks' on the way out.

Skytells signs the raw body with a hex HMAC-SHA256 keyed by the API key (or an
enterprise webhook secret). The relay signs `{id}.{timestamp}.{body}` with the app's
own `whsec_` secret, so the app verifies without ever holding the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable

SKYTELLS_HEADER = "X-Skytells-Signature"
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # what `webhooks secret` makes; the spec allows 24 to 64
_HEX_SIGNATURE = re.compile(r"[0-9a-f]{64}")


def skytells_signature(key: bytes, body: bytes) -> str:
    """The lowercase hex HMAC-SHA256 of the raw body, as Skytells sends it."""
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_skytells(body: bytes, given: str | None, keys: Iterable[bytes]) -> bool:
    """Whether `given` is the signature of `body` under any of `keys`, compared in constant time."""
    if not given:
        return False
    candidate = given.strip().lower()
    if not _HEX_SIGNATURE.fullmatch(candidate):
        return False
    matched = False
    for key in keys:
        # Every key is tried, so the time taken does not say which one matched.
        matched |= hmac.compare_digest(skytells_signature(key, body), candidate)
    return matched


class SigningSecret:
    """A relay secret `whsec_<base64>`; its repr shows a fingerprint, never the bytes."""

    __slots__ = ("_key", "fingerprint")

    def __init__(self, text: str) -> None:
        if not text.startswith(SECRET_PREFIX):
            raise ValueError(f'a signing secret starts with "{SECRET_PREFIX}"')
        encoded = text[len(SECRET_PREFIX) :]
        try:
            # Some tools drop the padding; the decoder only needs enough of it.
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"a signing secret is {SECRET_PREFIX} and base64") from None
        if not 24 <= len(key) <= 64:
            raise ValueError("a signing secret decodes to 24 to 64 bytes")
        self._key = key
        self.fingerprint = hashlib.sha256(key).hexdigest()[:8]

    def sign(self, message_id: str, timestamp: int, body: bytes) -> str:
        signed = b"%s.%d.%s" % (message_id.encode("ascii"), timestamp, body)
        digest = hmac.new(self._key, signed, hashlib.sha256).digest()
        return "v1," + base64.b64encode(digest).decode("ascii")

    def __repr__(self) -> str:
        return f"SigningSecret({self.fingerprint})"

    __str__ = __repr__

    def __reduce__(self) -> str:
        raise TypeError("a SigningSecret cannot be pickled")


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def signature_header(message_id: str, timestamp: int, body: bytes, signing: Iterable[SigningSecret]) -> str:
    """`webhook-signature`: one `v1,` signature per secret, space-separated during a rotation."""
    return " ".join(secret.sign(message_id, timestamp, body) for secret in signing)


class SigningKeys:
    """The relay's current secret, and during a rotation the previous one until it expires."""

    __slots__ = ("current", "previous", "previous_until")

    def __init__(
        self,
        current: SigningSecret,
        previous: SigningSecret | None = None,
        previous_until: float | None = None,
    ) -> None:
        self.current = current
        self.previous = previous
        self.previous_until = previous_until

    def active(self, now: float) -> tuple[SigningSecret, ...]:
        if self.previous is not None and self.previous_until is not None and now < self.previous_until:
            return (self.current, self.previous)
        return (self.current,)

    def __repr__(self) -> str:
        return f"SigningKeys({self.current!r}, previous={self.previous!r})"
