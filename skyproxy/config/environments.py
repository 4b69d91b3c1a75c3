"""The `[environments.NAME]` tables: listeners, upstream, key source and rule overrides.

Each function takes the parser for its typed getters, so errors carry the same file, line
and field path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from skyproxy.config import limits
from skyproxy.config import webhooks as webhook_table
from skyproxy.config.settings import (
    DEFAULT_UPSTREAM,
    EnvironmentSettings,
    KeySpec,
    Listen,
    ServerSettings,
    default_of,
)

if TYPE_CHECKING:
    from skyproxy.config.parser import _Parser


def environments(
    p: _Parser, data: dict[str, Any], rules: list[dict[str, Any]], server: ServerSettings
) -> dict[str, EnvironmentSettings]:
    envs = p.table(data, "environments", "")
    if not envs:
        raise p.error("environments", "missing: define at least one [environments.NAME]")
    result: dict[str, EnvironmentSettings] = {}
    seen: dict[Listen, str] = {}
    for name, env in envs.items():
        where = f"environments.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise p.expected(where, "a name of letters, digits, - and _", name)
        if not isinstance(env, dict):
            raise p.expected(where, "a table", env)
        result[name] = environment(p, name, env, rules, server)
        for i, listen in enumerate(result[name].listen):
            clash = next((other for other in seen if listen.overlaps(other)), None)
            if clash is not None:
                raise p.error(f"{where}.listen[{i}]", f"{listen} is already used by {seen[clash]}")
            seen[listen] = name
    return result


def environment(
    p: _Parser,
    name: str,
    data: dict[str, Any],
    rules: list[dict[str, Any]],
    server: ServerSettings,
) -> EnvironmentSettings:
    where = f"environments.{name}"
    p.check_keys(data, where, {"listen", "upstream", "key", "rate_limit", "webhook_secret", "client_auth"})
    raw_listen = p.strings(data, "listen", where)
    if not raw_listen:
        raise p.error(f"{where}.listen", 'missing: list addresses like "127.0.0.1:8787"')
    listen = tuple(p.listen(v, f"{where}.listen[{i}]") for i, v in enumerate(raw_listen))
    for i, address in enumerate(listen):
        if not address.is_loopback and not server.allowed_networks:
            raise p.error(
                f"{where}.listen[{i}]",
                f"{address} is not loopback, so [server] allowed_networks must list the "
                "networks allowed to connect",
            )
    upstream = upstream_url(p, p.get(data, "upstream", where, str, DEFAULT_UPSTREAM, "a URL"), where)
    override = p.table(data, "rate_limit", where)
    p.check_keys(
        override, f"{where}.rate_limit", {"per_user", "per_environment", "max_wait", "max_in_flight"}
    )
    return EnvironmentSettings(
        name=name,
        listen=listen,
        upstream=upstream,
        key=key_spec(p, data, where, name, upstream == "mock"),
        rules=tuple(
            limits.rule(p, r, f"rate_limit.rules[{i}]", override, f"{where}.rate_limit")
            for i, r in enumerate(rules)
        ),
        client_auth=p.choice(
            data,
            "client_auth",
            where,
            ("off", "optional", "required"),
            default_of(EnvironmentSettings, "client_auth"),
        ),
        webhook_secret=webhook_table.key_source(p, data, "webhook_secret", where, None),
    )


def upstream_url(p: _Parser, value: str, where: str) -> str:
    if value == "mock":
        return value
    field_path = f"{where}.upstream"
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@", value):
        # Credentials would show in status and logs, so the value is not echoed either.
        raise p.error(field_path, "a user or password in the URL is not allowed (the key has key = ...)")
    found = re.fullmatch(r"(https?)://([^/\s?#]+)(/v1)?/?", value)
    if not found:
        raise p.expected(field_path, '"mock" or a URL like "https://api.skytells.ai"', value)
    scheme, authority = found.group(1), found.group(2)
    try:
        port = urlsplit(f"{scheme}://{authority}").port
    except ValueError:
        raise p.expected(field_path, "a port from 1 to 65535", value) from None
    if port == 0:
        raise p.expected(field_path, "a port from 1 to 65535", value)
    return f"{scheme}://{authority}"


def key_spec(p: _Parser, data: Mapping[str, Any], where: str, name: str, is_mock: bool) -> KeySpec:
    raw = p.get(data, "key", f"{where}", str, "", "a key source")
    if not raw:
        return KeySpec("generated") if is_mock else KeySpec("keyring", "")
    kind, _, arg = raw.partition(":")
    field_path = f"{where}.key"
    if kind == "keyring":
        return KeySpec("keyring", arg)
    if kind == "env" and arg:
        return KeySpec("env", arg)
    if kind == "credential" and arg:
        return KeySpec("credential", arg)
    if kind == "file" and arg:
        return KeySpec("file", str(p.file_path(arg, field_path)))
    raise p.expected(
        field_path,
        '"keyring", "env:VAR", "file:/path" or "credential:NAME" (never the key itself)',
        raw if len(raw) < 12 else raw[:4] + "…",
    )
