"""Parsing and validating the TOML text into `Settings`: types, ranges, and where each error is."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from skyproxy.config import access, limits
from skyproxy.config import cluster as cluster_table
from skyproxy.config import environments as environment_tables
from skyproxy.config import webhooks as webhook_table
from skyproxy.config.lines import join_field, line_of
from skyproxy.config.settings import (
    DEFAULT_AUDIT_PATH,
    SEARCH_PATH,
    AuditSettings,
    Budget,
    ClusterSettings,
    EnvironmentSettings,
    IPNetwork,
    KeysSettings,
    Listen,
    MockSettings,
    ServerSettings,
    Settings,
    WebhookSettings,
)
from skyproxy.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def find_config(explicit: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """The config to use: -c, then $SKYPROXY_CONFIG, then the search path."""
    if explicit:
        return Path(explicit)
    if environ.get("SKYPROXY_CONFIG"):
        return Path(environ["SKYPROXY_CONFIG"])
    for candidate in SEARCH_PATH:
        path = candidate.expanduser()
        if path.is_file():
            return path
    searched = ", ".join(str(p) for p in SEARCH_PATH)
    raise ConfigError(
        f"no config file found (searched -c, $SKYPROXY_CONFIG, {searched}); start from skyproxy.toml.example",
        file="skyproxy.toml",
    )


def load(path: Path | str, environ: Mapping[str, str] = os.environ) -> Settings:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "file not found; start from the example: cp skyproxy.toml.example skyproxy.toml", file=path
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=path) from None
    return parse(text, path, environ)


def parse(text: str, path: Path, environ: Mapping[str, str] = os.environ) -> Settings:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _decode_error_line(exc)
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ConfigError(f"invalid TOML: {message}", file=path, line=line) from None
    return _Parser(text, path.resolve(), environ).settings(data)


def _decode_error_line(exc: Exception) -> int | None:
    lineno = getattr(exc, "lineno", None)
    if isinstance(lineno, int):
        return lineno
    found = re.search(r"at line (\d+)", str(exc))
    return int(found.group(1)) if found else None


T = TypeVar("T")
MAX_SECONDS = 86_400.0  # the longest any timeout or wait may be: a day
MAX_PRICE_USD = 1_000_000.0


class _Parser:
    """Walks the TOML document, turning each table into its frozen settings object."""

    def __init__(self, text: str, path: Path, environ: Mapping[str, str]) -> None:
        self.text = text
        self.path = path
        self.base = path.parent
        self.environ = environ

    # -- errors -------------------------------------------------------------------------
    def error(self, field_path: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.path, line=line_of(self.text, field_path), field=field_path)

    def expected(self, field_path: str, what: str, got: object) -> ConfigError:
        return self.error(field_path, f"expected {what}, got {_show(got)}")

    def missing(self, table: str, key: str, what: str) -> ConfigError:
        """A required key that is absent: the line of its table, where it belongs."""
        line = line_of(self.text, table)
        return ConfigError(f"missing: {what}", file=self.path, line=line, field=join_field(table, key))

    # -- typed getters ------------------------------------------------------------------
    def table(self, data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.expected(join_field(where, key), "a table", value)
        return value

    def check_keys(self, data: Mapping[str, Any], where: str, allowed: set[str]) -> None:
        for key in data:
            if key not in allowed:
                hint = _suggest(key, allowed)
                raise self.error(join_field(where, key), f"unknown key{hint}")

    def get(
        self,
        data: Mapping[str, Any],
        key: str,
        where: str,
        kind: type[T] | tuple[type, ...],
        default: T,
        what: str,
    ) -> T:
        if key not in data:
            return default
        value = data[key]
        bad_bool = isinstance(value, bool) and kind is not bool
        if bad_bool or not isinstance(value, kind):
            raise self.expected(join_field(where, key), what, value)
        return value  # type: ignore[return-value]

    def number(
        self,
        data: Mapping[str, Any],
        key: str,
        where: str,
        default: float,
        *,
        minimum: float = 0,
        maximum: float = MAX_SECONDS,
    ) -> float:
        value = self.get(data, key, where, (int, float), default, "a number")
        # TOML has nan and inf; either would silently disable a timeout or a budget.
        if not math.isfinite(value) or not minimum <= value <= maximum:
            raise self.expected(join_field(where, key), f"a number from {minimum:g} to {maximum:g}", value)
        return float(value)

    def integer(
        self, data: Mapping[str, Any], key: str, where: str, default: int, *, minimum: int = 0
    ) -> int:
        value = self.get(data, key, where, int, default, "an integer")
        if value < minimum:
            raise self.expected(join_field(where, key), f"an integer >= {minimum}", value)
        return value

    def strings(self, data: Mapping[str, Any], key: str, where: str) -> list[str]:
        value = self.get(data, key, where, list, [], "a list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.expected(f"{join_field(where, key)}[{i}]", "a string", item)
        return value

    def choice(
        self, data: Mapping[str, Any], key: str, where: str, options: tuple[str, ...], default: str
    ) -> Any:
        what = " or ".join(f'"{o}"' for o in options)
        value = self.get(data, key, where, str, default, what)
        if value not in options:
            raise self.expected(join_field(where, key), what, value)
        return value

    def file_path(self, raw: str, field_path: str) -> Path:
        expanded = os.path.expanduser(raw)
        for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", expanded):
            if name not in self.environ:
                raise self.error(field_path, f"environment variable ${name} is not set")
            expanded = re.sub(r"\$\{" + name + r"\}|\$" + name + r"\b", self.environ[name], expanded)
        path = Path(expanded)
        return path if path.is_absolute() else self.base / path

    # -- tables -------------------------------------------------------------------------
    def settings(self, data: dict[str, Any]) -> Settings:
        tables = {"server", "environments", "rate_limit", "audit", "pricing", "keys", "mock", "webhooks"}
        self.check_keys(data, "", tables | {"cluster", "tokens", "budgets"})
        server = self.server(self.table(data, "server", ""))
        rate_limit, rules = limits.rate_limit(self, self.table(data, "rate_limit", ""))
        environments = environment_tables.environments(self, data, rules, server)
        audit = self.audit(self.table(data, "audit", ""))
        return Settings(
            path=self.path,
            server=server,
            environments=MappingProxyType(environments),
            rate_limit=rate_limit,
            audit=audit,
            pricing=self.pricing(self.table(data, "pricing", "")),
            keys=self.keys(self.table(data, "keys", "")),
            mock=self.mock(self.table(data, "mock", "")),
            webhooks=self.webhooks(data, environments),
            cluster=self.cluster(data),
            tokens=access.tokens(self, self.table(data, "tokens", "")),
            budgets=self.budgets(data, set(environments), audit),
        )

    def webhooks(
        self, data: dict[str, Any], environments: Mapping[str, EnvironmentSettings]
    ) -> WebhookSettings | None:
        if "webhooks" not in data:
            return None
        taken = {listen: name for name, env in environments.items() for listen in env.listen}
        return webhook_table.webhooks(self, self.table(data, "webhooks", ""), taken)

    def budgets(
        self, data: dict[str, Any], environments: set[str], audit: AuditSettings
    ) -> tuple[Budget, ...]:
        found = access.budgets(self, data, environments)
        if found and not audit.enabled:
            raise self.error("budgets", "spend is read from the audit trail: [audit] enabled must be true")
        return found

    def server(self, data: dict[str, Any]) -> ServerSettings:
        w = "server"
        d = ServerSettings()
        self.check_keys(data, w, {f.name for f in fields(ServerSettings)})
        hosts = frozenset(h.lower() for h in self.strings(data, "allowed_hosts", w))
        origins = self.strings(data, "allowed_origins", w)
        for i, origin in enumerate(origins):
            self.check_origin(origin, f"{w}.allowed_origins[{i}]")
        return ServerSettings(
            allowed_hosts=hosts,
            allowed_origins=frozenset(o.lower() for o in origins),
            allowed_networks=self.networks(data, "allowed_networks", w),
            dashboard_networks=self.networks(data, "dashboard_networks", w),
            max_body_bytes=self.integer(data, "max_body_bytes", w, d.max_body_bytes, minimum=1),
            upstream_timeout=self.number(data, "upstream_timeout", w, d.upstream_timeout, minimum=0.001),
            connect_timeout=self.number(data, "connect_timeout", w, d.connect_timeout, minimum=0.001),
            idle_timeout=self.number(data, "idle_timeout", w, d.idle_timeout, minimum=0.001),
            header_timeout=self.number(data, "header_timeout", w, d.header_timeout, minimum=0.001),
            keepalive_timeout=self.number(data, "keepalive_timeout", w, d.keepalive_timeout, minimum=0.001),
            max_connections=self.integer(data, "max_connections", w, d.max_connections, minimum=1),
            watch_config=self.get(data, "watch_config", w, bool, d.watch_config, "true or false"),
            scan_success_bodies=self.get(
                data, "scan_success_bodies", w, bool, d.scan_success_bodies, "true or false"
            ),
            shutdown_timeout=self.number(data, "shutdown_timeout", w, d.shutdown_timeout),
            event_loop=self.choice(data, "event_loop", w, ("auto", "asyncio", "uvloop"), d.event_loop),
            log_level=self.choice(data, "log_level", w, ("debug", "info", "warning", "error"), d.log_level),
        )

    def networks(self, data: dict[str, Any], key: str, where: str) -> tuple[IPNetwork, ...]:
        networks = []
        for i, cidr in enumerate(self.strings(data, key, where)):
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                raise self.expected(f"{where}.{key}[{i}]", "a CIDR", cidr) from None
        return tuple(networks)

    def check_origin(self, origin: str, field_path: str) -> None:
        if origin in ("*", "null"):
            raise self.error(field_path, f"{origin!r} is never allowed; list exact origins")
        if not re.fullmatch(r"https?://[^/\s]+", origin):
            raise self.expected(field_path, 'an origin like "https://app.example.com"', origin)

    def listen(self, value: str, field_path: str) -> Listen:
        found = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", value)
        if not found:
            raise self.expected(field_path, '"host:port"', value)
        host = found.group(1) or found.group(3)
        port = int(found.group(2) or found.group(4))
        if port > 65535:
            raise self.expected(field_path, "a port from 0 to 65535", value)
        if host != "localhost":
            try:
                host = str(ipaddress.ip_address(host))
            except ValueError:
                raise self.expected(field_path, "an IP address or localhost", host) from None
        return Listen(host, port)

    def audit(self, data: dict[str, Any]) -> AuditSettings:
        w = "audit"
        self.check_keys(data, w, {f.name for f in fields(AuditSettings)})
        raw_path = self.get(data, "path", w, str, DEFAULT_AUDIT_PATH, "a file path")
        d = AuditSettings(path=Path(raw_path))
        return AuditSettings(
            path=self.file_path(raw_path, f"{w}.path"),
            enabled=self.get(data, "enabled", w, bool, d.enabled, "true or false"),
            max_bytes=self.integer(data, "max_bytes", w, d.max_bytes),
            backup_count=self.integer(data, "backup_count", w, d.backup_count),
            rotate_daily=self.get(data, "rotate_daily", w, bool, d.rotate_daily, "true or false"),
            on_failure=self.choice(data, "on_failure", w, ("continue", "reject"), d.on_failure),
            queue_size=self.integer(data, "queue_size", w, d.queue_size, minimum=1),
        )

    def pricing(self, data: dict[str, Any]) -> Mapping[str, float]:
        prices: dict[str, float] = {}
        for model in data:
            prices[model] = self.number(data, model, "pricing", 0.0, maximum=MAX_PRICE_USD)
        return MappingProxyType(prices)

    def keys(self, data: dict[str, Any]) -> KeysSettings:
        self.check_keys(data, "keys", {"max_age_days", "state_file"})
        state = self.get(data, "state_file", "keys", str, "", "a file path")
        return KeysSettings(
            max_age_days=self.integer(data, "max_age_days", "keys", KeysSettings().max_age_days, minimum=1),
            state_file=self.file_path(state, "keys.state_file") if state else None,
        )

    def mock(self, data: dict[str, Any]) -> MockSettings:
        self.check_keys(data, "mock", {"delay"})
        return MockSettings(delay=self.number(data, "delay", "mock", MockSettings().delay))

    def cluster(self, data: dict[str, Any]) -> ClusterSettings | None:
        if "cluster" not in data:
            return None
        return cluster_table.cluster(self, self.table(data, "cluster", ""))


def _show(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _suggest(key: str, allowed: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    expected = ", ".join(sorted(allowed))
    return f' (did you mean "{close[0]}"?)' if close else f" (expected one of: {expected})"
