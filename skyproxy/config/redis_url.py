"""Reading a Redis URL without ever repeating its credentials.

A Redis URL may carry a password (`redis://:pw@host/0`, `unix://:pw@/run/redis.sock`,
`?password=pw`), so every message about one is built from `RedisLocation.shown`: the
scheme, host, port (or socket path) and database, nothing else. A `ValueError` raised
here names what is wrong, never the value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

SCHEMES = ("redis", "rediss", "unix")
_DB = re.compile(r"\d{1,5}")


@dataclass(frozen=True, slots=True)
class RedisLocation:
    """Where a Redis URL points, without its credentials."""

    scheme: str
    host: str  # the socket path for unix://
    port: int | None
    db: int
    has_credentials: bool
    secrets: tuple[str, ...]  # the password (and user) as written and decoded, for scrubbing

    @property
    def shown(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.host}?db={self.db}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/{self.db}"


def is_redis_url(value: str) -> bool:
    return value.split("://", 1)[0].lower() in SCHEMES and "://" in value


def parse_redis_url(url: str) -> RedisLocation:
    """The location a redis://, rediss:// or unix:// URL names; `ValueError` never echoes it."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("the URL is malformed (check the host and port)") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError("the URL must start with redis://, rediss:// or unix://")
    query = parse_qs(parts.query)
    secrets = _secrets(parts.username, parts.password, query)
    has_credentials = bool(parts.username or parts.password or "password" in query)
    db = _db(parts.path if scheme != "unix" else "", query)
    if scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs the socket's path, as in unix:///run/redis/redis.sock")
        return RedisLocation(scheme, parts.path, None, db, has_credentials, secrets)
    if not parts.hostname:
        raise ValueError("the URL has no host")
    if port == 0:
        raise ValueError("the port must be from 1 to 65535")
    return RedisLocation(scheme, parts.hostname, port or 6379, db, has_credentials, secrets)


def _db(path: str, query: dict[str, list[str]]) -> int:
    raw = path.strip("/") or (query.get("db") or ["0"])[0]
    if not _DB.fullmatch(raw):
        raise ValueError("the database must be a number, as in redis://host:6379/0")
    return int(raw)


def _secrets(user: str | None, password: str | None, query: dict[str, list[str]]) -> tuple[str, ...]:
    found = [value for value in (user, password) if value]
    found += query.get("password", []) + query.get("username", [])
    both = {form for value in found for form in (value, unquote(value))}
    # Longest first, so scrubbing a password never leaves the tail of a longer one behind.
    return tuple(sorted(both, key=len, reverse=True))
