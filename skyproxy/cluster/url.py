"""The Redis URL as a secret: it may hold a password, so only its location is ever shown."""

from __future__ import annotations

import os
from collections.abc import Mapping

from skyproxy.config import ClusterSettings
from skyproxy.config.redis_url import RedisLocation, parse_redis_url
from skyproxy.errors import KeySourceError
from skyproxy.keys.sources import resolve

# The name a key source error and the keyring username use for the Redis URL.
KEY_NAME = "cluster"


class RedisURL:
    """A Redis URL. Only `reveal()` gives it; repr, str and `shown` give host and database."""

    __slots__ = ("_location", "_value", "shown")

    def __init__(self, value: str) -> None:
        location = parse_redis_url(value)  # a ValueError here never holds the value
        self._value = value
        self._location = location
        self.shown = location.shown

    def reveal(self) -> str:
        return self._value

    def scrub(self, text: str) -> str:
        """`text` with the URL and any of its credentials blanked out."""
        text = text.replace(self._value, self.shown)
        for secret in self._location.secrets:
            text = text.replace(secret, "***")
        return text

    def __repr__(self) -> str:
        return f"RedisURL({self.shown})"

    __str__ = __repr__

    def __reduce__(self) -> str:
        raise TypeError("a RedisURL cannot be pickled")


def resolve_url(settings: ClusterSettings, environ: Mapping[str, str] = os.environ) -> RedisURL:
    """The configured URL, read from its key source when it has one; errors never hold it."""
    if settings.redis is None:
        return RedisURL(settings.redis_url)
    value = resolve(KEY_NAME, settings.redis, environ).reveal()
    try:
        return RedisURL(value)
    except ValueError as exc:
        raise KeySourceError(KEY_NAME, str(settings.redis), f"not a Redis URL: {exc}") from None


__all__ = ["KEY_NAME", "RedisLocation", "RedisURL", "resolve_url"]
