"""The `[webhooks]` table and `environments.X.webhook_secret`: parsed and checked like the rest."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from skyproxy.config.settings import (
    DEFAULT_WEBHOOK_STORE,
    KeySpec,
    Listen,
    TargetPattern,
    WebhookSettings,
)

if TYPE_CHECKING:
    from skyproxy.config.parser import _Parser

MAX_BODY_BYTES = 1 << 30
MAX_SECONDS = 86_400.0  # as for every other wait
MAX_RETRIES = 100
_URL = re.compile(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(\d+|\*))?(/[^\s?#]*)?")
_KEY_SOURCE = '"keyring", "keyring:NAME", "env:VAR", "file:/path" or "credential:NAME"'


def webhooks(parser: _Parser, data: dict[str, Any], taken: Mapping[Listen, str]) -> WebhookSettings:
    """The `[webhooks]` table; `taken` maps every environment's listen address to its name."""
    w = "webhooks"
    parser.check_keys(data, w, {f.name for f in fields(WebhookSettings)})
    d = WebhookSettings(store=parser.base)
    raw_listen = parser.strings(data, "listen", w) if "listen" in data else [str(x) for x in d.listen]
    if not raw_listen:
        raise parser.error(f"{w}.listen", 'missing: list addresses like "127.0.0.1:8789"')
    listen = tuple(parser.listen(v, f"{w}.listen[{i}]") for i, v in enumerate(raw_listen))
    for i, address in enumerate(listen):
        clash = next((other for other in taken if address.overlaps(other)), None)
        if clash is not None:
            # The receiver's port serves only the hooks: it must never be a proxy port.
            raise parser.error(f"{w}.listen[{i}]", f"{address} is already used by {taken[clash]}")
    store = parser.get(data, "store", w, str, DEFAULT_WEBHOOK_STORE, "a file path")
    public_url = parser.get(data, "public_url", w, str, "", "a URL")
    return WebhookSettings(
        store=parser.file_path(store, f"{w}.store"),
        listen=listen,
        public_url=_public_url(parser, public_url) if public_url else None,
        signing_secret=key_source(parser, data, "signing_secret", w, d.signing_secret),
        allowed_targets=tuple(
            _target(parser, value, f"{w}.allowed_targets[{i}]")
            for i, value in enumerate(parser.strings(data, "allowed_targets", w))
        )
        if "allowed_targets" in data
        else d.allowed_targets,
        retry_schedule=_schedule(parser, data, w, d.retry_schedule),
        max_body_bytes=_bounded_int(parser, data, "max_body_bytes", w, d.max_body_bytes),
    )


def key_source(
    parser: _Parser, data: Mapping[str, Any], key: str, where: str, default: KeySpec | None
) -> Any:
    """A key source written as text: never the secret itself, which is not echoed."""
    raw = parser.get(data, key, where, str, "", "a key source")
    field_path = f"{where}.{key}"
    if not raw:
        if key in data:
            raise parser.expected(field_path, _KEY_SOURCE, raw)
        return default
    kind, _, arg = raw.partition(":")
    if kind == "keyring":
        return KeySpec("keyring", arg or (default.arg if default else ""))
    if kind == "env" and arg:
        return KeySpec("env", arg)
    if kind == "credential" and arg:
        return KeySpec("credential", arg)
    if kind == "file" and arg:
        return KeySpec("file", str(parser.file_path(arg, field_path)))
    shown = raw if len(raw) < 12 else raw[:4] + "…"
    raise parser.expected(field_path, f"{_KEY_SOURCE} (never the secret itself)", shown)


def _public_url(parser: _Parser, value: str) -> str:
    field_path = "webhooks.public_url"
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@", value):
        raise parser.error(field_path, "a user or password in the URL is not allowed")
    found = _URL.fullmatch(value)
    if not found or found.group(3) == "*" or not _port_ok(found.group(3)) or not _host_ok(found.group(2)):
        raise parser.expected(field_path, 'a URL like "https://hooks.example.com"', value)
    return value.rstrip("/")


def _target(parser: _Parser, value: str, field_path: str) -> TargetPattern:
    what = 'a URL prefix like "http://127.0.0.1:*" or "https://app.example.com/hooks"'
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@", value):
        raise parser.error(field_path, "a user or password in the URL is not allowed")
    found = _URL.fullmatch(value)
    if not found or not _port_ok(found.group(3)) or not _host_ok(found.group(2)):
        raise parser.expected(field_path, what, value)
    scheme, host, port = found.group(1), found.group(2).lower(), found.group(3)
    if port is None:
        port = "80" if scheme == "http" else "443"
    return TargetPattern(scheme, host.strip("[]"), None if port == "*" else int(port), found.group(4) or "")


def _port_ok(port: str | None) -> bool:
    return port is None or port == "*" or 1 <= int(port) <= 65535


def _host_ok(host: str) -> bool:
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
    return True


def _schedule(
    parser: _Parser, data: Mapping[str, Any], where: str, default: tuple[float, ...]
) -> tuple[float, ...]:
    if "retry_schedule" not in data:
        return default
    values = parser.get(data, "retry_schedule", where, list, [], "a list of seconds")
    if len(values) > MAX_RETRIES:
        raise parser.expected(f"{where}.retry_schedule", f"at most {MAX_RETRIES} delays", values)
    delays = []
    for i, value in enumerate(values):
        finite = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not finite or not 0 <= value <= MAX_SECONDS:
            what = f"a number of seconds from 0 to {MAX_SECONDS:g}"
            raise parser.expected(f"{where}.retry_schedule[{i}]", what, value)
        delays.append(float(value))
    return tuple(delays)


def _bounded_int(parser: _Parser, data: Mapping[str, Any], key: str, where: str, default: int) -> int:
    value = parser.integer(data, key, where, default, minimum=1)
    if value > MAX_BODY_BYTES:
        raise parser.expected(f"{where}.{key}", f"an integer from 1 to {MAX_BODY_BYTES}", value)
    return value
