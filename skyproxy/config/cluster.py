"""The `[cluster]` table: where Redis is, and what to do when it is not there.

The Redis URL may hold a password, so it is treated like a key: a key source, or a
literal URL without credentials. No message here ever repeats the value.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from skyproxy.config.redis_url import is_redis_url, parse_redis_url
from skyproxy.config.settings import ClusterSettings, KeySpec

if TYPE_CHECKING:
    from skyproxy.config.parser import _Parser

KEYRING_USERNAME = "cluster"
_KEY_SOURCE = '"env:VAR", "file:/path", "credential:NAME" or "keyring"'


def cluster(parser: _Parser, data: dict[str, Any]) -> ClusterSettings:
    w = "cluster"
    parser.check_keys(data, w, {"redis", "on_error", "timeout_ms", "prefix"})
    if "on_error" not in data:
        raise parser.missing(
            w,
            "on_error",
            'choose "closed" (answer 503 while Redis is unavailable) '
            'or "open" (serve without the shared limits)',
        )
    d = ClusterSettings(on_error="closed")
    prefix = parser.get(data, "prefix", w, str, d.prefix, "a key prefix")
    if not re.fullmatch(r"[\x21-\x7e]{1,64}", prefix):
        raise parser.expected(f"{w}.prefix", "1 to 64 printable characters without spaces", prefix)
    spec, url = redis_source(parser, data, w)
    return ClusterSettings(
        on_error=parser.choice(data, "on_error", w, ("closed", "open"), d.on_error),
        redis=spec,
        redis_url=url,
        timeout_ms=parser.number(data, "timeout_ms", w, d.timeout_ms, minimum=1, maximum=60_000),
        prefix=prefix,
    )


def redis_source(parser: _Parser, data: dict[str, Any], where: str) -> tuple[KeySpec | None, str]:
    """A key source for a URL that may hold a password, or a literal URL without one."""
    field_path = f"{where}.redis"
    raw = data.get("redis")
    if raw is None:
        raise parser.missing(where, "redis", 'a key source such as "env:SKYPROXY_REDIS_URL"')
    if not isinstance(raw, str):
        raise parser.expected(field_path, "a key source or a redis:// URL", raw)
    if is_redis_url(raw):
        try:
            location = parse_redis_url(raw)
        except ValueError as exc:
            raise parser.error(field_path, str(exc)) from None
        if location.has_credentials:
            raise parser.error(
                field_path,
                "a user or password in the URL is not allowed here; "
                f"put the URL in a key source ({_KEY_SOURCE})",
            )
        return None, raw
    kind, _, arg = raw.partition(":")
    if kind == "keyring":
        return KeySpec("keyring", arg or KEYRING_USERNAME), ""
    if kind == "env" and arg:
        return KeySpec("env", arg), ""
    if kind == "credential" and arg:
        return KeySpec("credential", arg), ""
    if kind == "file" and arg:
        return KeySpec("file", str(parser.file_path(arg, field_path))), ""
    raise parser.error(
        field_path,
        f"expected a key source ({_KEY_SOURCE}) or a redis://, rediss:// or unix:// URL without a password",
    )
