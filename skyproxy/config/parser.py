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
from urllib.parse import urlsplit

from skyproxy.config import access
from skyproxy.config import cluster as cluster_table
from skyproxy.config import webhooks as webhook_table
from skyproxy.config.lines import line_of
from skyproxy.config.settings import (
    DEFAULT_AUDIT_PATH,
    DEFAULT_RULE,
    DEFAULT_UPSTREAM,
    PERIODS,
    SEARCH_PATH,
    AuditSettings,
    Budget,
    ClusterSettings,
    EnvironmentSettings,
    IPNetwork,
    KeySpec,
    KeysSettings,
    Listen,
    MockSettings,
    Rate,
    RateLimitSettings,
    RateRule,
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
MAX_IN_FLIGHT = 1_000_000


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
        return ConfigError(f"missing: {what}", file=self.path, line=line, field=_join(table, key))

    # -- typed getters ------------------------------------------------------------------
    def table(self, data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.expected(_join(where, key), "a table", value)
        return value

    def check_keys(self, data: Mapping[str, Any], where: str, allowed: set[str]) -> None:
        for key in data:
            if key not in allowed:
                hint = _suggest(key, allowed)
                raise self.error(_join(where, key), f"unknown key{hint}")

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
            raise self.expected(_join(where, key), what, value)
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
            raise self.expected(_join(where, key), f"a number from {minimum:g} to {maximum:g}", value)
        return float(value)

    def integer(
        self, data: Mapping[str, Any], key: str, where: str, default: int, *, minimum: int = 0
    ) -> int:
        value = self.get(data, key, where, int, default, "an integer")
        if value < minimum:
            raise self.expected(_join(where, key), f"an integer >= {minimum}", value)
        return value

    def strings(self, data: Mapping[str, Any], key: str, where: str) -> list[str]:
        value = self.get(data, key, where, list, [], "a list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.expected(f"{_join(where, key)}[{i}]", "a string", item)
        return value

    def choice(
        self, data: Mapping[str, Any], key: str, where: str, options: tuple[str, ...], default: str
    ) -> Any:
        what = " or ".join(f'"{o}"' for o in options)
        value = self.get(data, key, where, str, default, what)
        if value not in options:
            raise self.expected(_join(where, key), what, value)
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
        rate_limit, rules = self.rate_limit(self.table(data, "rate_limit", ""))
        environments = self.environments(data, rules, server)
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

    def rate_limit(self, data: dict[str, Any]) -> tuple[RateLimitSettings, list[dict[str, Any]]]:
        w = "rate_limit"
        self.check_keys(data, w, {"enabled", "user_header", "missing_user", "rules"})
        d = RateLimitSettings()
        header = self.get(data, "user_header", w, str, d.user_header, "a header name")
        if not re.fullmatch(r"[A-Za-z0-9-]+", header):
            raise self.expected(f"{w}.user_header", "a header name", header)
        rules = self.get(data, "rules", w, list, [], "an array of tables [[rate_limit.rules]]")
        names: set[str] = set()
        for i, rule in enumerate(rules):
            if not isinstance(rule, dict):
                raise self.expected(f"{w}.rules[{i}]", "a table", rule)
            name = rule.get("name", "")
            if not isinstance(name, str):
                raise self.expected(f"{w}.rules[{i}].name", "a rule name", name)
            if name in names:
                # Limiter state survives a reload by rule name, so names must be unique.
                raise self.error(f"{w}.rules[{i}].name", f"duplicate rule name {rule['name']!r}")
            names.add(name)
        settings = RateLimitSettings(
            enabled=self.get(data, "enabled", w, bool, d.enabled, "true or false"),
            user_header=header,
            missing_user=self.choice(data, "missing_user", w, ("reject", "shared"), d.missing_user),
        )
        if not settings.enabled:
            return settings, []
        return settings, rules or [DEFAULT_RULE]

    def rule(
        self, data: Mapping[str, Any], where: str, override: Mapping[str, Any], override_where: str
    ) -> RateRule:
        self.check_keys(
            data,
            where,
            {"name", "methods", "paths", "per_user", "per_environment", "max_wait", "max_in_flight"},
        )
        name = self.get(data, "name", where, str, "", "a rule name")
        if not name:
            raise self.error(f"{where}.name", "missing: every rule needs a name")
        methods = [m.upper() for m in self.strings(data, "methods", where)] or ["POST"]
        paths = self.strings(data, "paths", where)
        if not paths:
            raise self.error(f"{where}.paths", "missing: list the paths this rule limits")
        for i, p in enumerate(paths):
            if not p.startswith("/") or "*" in p[:-1]:
                raise self.expected(f"{where}.paths[{i}]", 'a path like "/v1/x" or "/v1/*"', p)

        def source(key: str) -> tuple[Mapping[str, Any], str]:
            # An environment's override is reported at its own field path and line.
            return (override, override_where) if key in override else (data, where)

        wait_data, wait_where = source("max_wait")
        return RateRule(
            name=name,
            methods=frozenset(methods),
            paths=tuple(paths),
            per_user=self.rate("per_user", *source("per_user")),
            per_environment=self.rate("per_environment", *source("per_environment")),
            max_wait=self.number(wait_data, "max_wait", wait_where, _default(RateRule, "max_wait")),
            max_in_flight=self.max_in_flight(*source("max_in_flight")),
        )

    def max_in_flight(self, data: Mapping[str, Any], where: str) -> int | None:
        if "max_in_flight" not in data:
            return None
        value = self.integer(data, "max_in_flight", where, 0, minimum=1)
        if value > MAX_IN_FLIGHT:
            raise self.expected(_join(where, "max_in_flight"), f"an integer from 1 to {MAX_IN_FLIGHT}", value)
        return value

    def rate(self, key: str, data: Mapping[str, Any], where: str) -> Rate | None:
        value = data.get(key)
        if value is None:
            return None
        what = '"N/second", "N/minute", "N/hour" or "N/day"'
        found = isinstance(value, str) and re.fullmatch(
            r"\s*(\d+)\s*/\s*(second|minute|hour|day)s?\s*", value
        )
        if not found or int(found.group(1)) < 1:
            raise self.expected(_join(where, key), what, value)
        unit = found.group(2)
        return Rate(int(found.group(1)), PERIODS[unit], unit)

    def environments(
        self, data: dict[str, Any], rules: list[dict[str, Any]], server: ServerSettings
    ) -> dict[str, EnvironmentSettings]:
        envs = self.table(data, "environments", "")
        if not envs:
            raise self.error("environments", "missing: define at least one [environments.NAME]")
        result: dict[str, EnvironmentSettings] = {}
        seen: dict[Listen, str] = {}
        for name, env in envs.items():
            where = f"environments.{name}"
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise self.expected(where, "a name of letters, digits, - and _", name)
            if not isinstance(env, dict):
                raise self.expected(where, "a table", env)
            result[name] = self.environment(name, env, rules, server)
            for i, listen in enumerate(result[name].listen):
                clash = next((other for other in seen if listen.overlaps(other)), None)
                if clash is not None:
                    raise self.error(f"{where}.listen[{i}]", f"{listen} is already used by {seen[clash]}")
                seen[listen] = name
        return result

    def environment(
        self,
        name: str,
        data: dict[str, Any],
        rules: list[dict[str, Any]],
        server: ServerSettings,
    ) -> EnvironmentSettings:
        where = f"environments.{name}"
        self.check_keys(
            data, where, {"listen", "upstream", "key", "rate_limit", "webhook_secret", "client_auth"}
        )
        raw_listen = self.strings(data, "listen", where)
        if not raw_listen:
            raise self.error(f"{where}.listen", 'missing: list addresses like "127.0.0.1:8787"')
        listen = tuple(self.listen(v, f"{where}.listen[{i}]") for i, v in enumerate(raw_listen))
        for i, address in enumerate(listen):
            if not address.is_loopback and not server.allowed_networks:
                raise self.error(
                    f"{where}.listen[{i}]",
                    f"{address} is not loopback, so [server] allowed_networks must list the "
                    "networks allowed to connect",
                )
        upstream = self.upstream(self.get(data, "upstream", where, str, DEFAULT_UPSTREAM, "a URL"), where)
        override = self.table(data, "rate_limit", where)
        self.check_keys(
            override, f"{where}.rate_limit", {"per_user", "per_environment", "max_wait", "max_in_flight"}
        )
        return EnvironmentSettings(
            name=name,
            listen=listen,
            upstream=upstream,
            key=self.key(data, where, name, upstream == "mock"),
            rules=tuple(
                self.rule(r, f"rate_limit.rules[{i}]", override, f"{where}.rate_limit")
                for i, r in enumerate(rules)
            ),
            client_auth=self.choice(
                data,
                "client_auth",
                where,
                ("off", "optional", "required"),
                _default(EnvironmentSettings, "client_auth"),
            ),
            webhook_secret=webhook_table.key_source(self, data, "webhook_secret", where, None),
        )

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

    def upstream(self, value: str, where: str) -> str:
        if value == "mock":
            return value
        field_path = f"{where}.upstream"
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@", value):
            # Credentials would show in status and logs, so the value is not echoed either.
            raise self.error(
                field_path, "a user or password in the URL is not allowed (the key has key = ...)"
            )
        found = re.fullmatch(r"(https?)://([^/\s?#]+)(/v1)?/?", value)
        if not found:
            raise self.expected(field_path, '"mock" or a URL like "https://api.skytells.ai"', value)
        scheme, authority = found.group(1), found.group(2)
        try:
            port = urlsplit(f"{scheme}://{authority}").port
        except ValueError:
            raise self.expected(field_path, "a port from 1 to 65535", value) from None
        if port == 0:
            raise self.expected(field_path, "a port from 1 to 65535", value)
        return f"{scheme}://{authority}"

    def key(self, data: Mapping[str, Any], where: str, name: str, is_mock: bool) -> KeySpec:
        raw = self.get(data, "key", f"{where}", str, "", "a key source")
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
            return KeySpec("file", str(self.file_path(arg, field_path)))
        raise self.expected(
            field_path,
            '"keyring", "env:VAR", "file:/path" or "credential:NAME" (never the key itself)',
            raw if len(raw) < 12 else raw[:4] + "…",
        )

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


def _default(cls: type, name: str) -> Any:
    """A dataclass field's default: the one place each default is written."""
    return next(f.default for f in fields(cls) if f.name == name)


def _join(where: str, key: str) -> str:
    if not where:
        return key
    if re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return f"{where}.{key}"
    return f'{where}."{key}"'


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
