"""The `[rate_limit]` table and its rules: rates, waits and in-flight caps.

Each function takes the parser for its typed getters, so errors carry the same file, line
and field path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from skyproxy.config.lines import join_field
from skyproxy.config.settings import (
    DEFAULT_RULE,
    PERIODS,
    Rate,
    RateLimitSettings,
    RateRule,
    default_of,
)

if TYPE_CHECKING:
    from skyproxy.config.parser import _Parser

MAX_IN_FLIGHT = 1_000_000


def rate_limit(p: _Parser, data: dict[str, Any]) -> tuple[RateLimitSettings, list[dict[str, Any]]]:
    w = "rate_limit"
    p.check_keys(data, w, {"enabled", "user_header", "missing_user", "rules"})
    d = RateLimitSettings()
    header = p.get(data, "user_header", w, str, d.user_header, "a header name")
    if not re.fullmatch(r"[A-Za-z0-9-]+", header):
        raise p.expected(f"{w}.user_header", "a header name", header)
    rules = p.get(data, "rules", w, list, [], "an array of tables [[rate_limit.rules]]")
    names: set[str] = set()
    for i, entry in enumerate(rules):
        if not isinstance(entry, dict):
            raise p.expected(f"{w}.rules[{i}]", "a table", entry)
        name = entry.get("name", "")
        if not isinstance(name, str):
            raise p.expected(f"{w}.rules[{i}].name", "a rule name", name)
        if name in names:
            # Limiter state survives a reload by rule name, so names must be unique.
            raise p.error(f"{w}.rules[{i}].name", f"duplicate rule name {entry['name']!r}")
        names.add(name)
    settings = RateLimitSettings(
        enabled=p.get(data, "enabled", w, bool, d.enabled, "true or false"),
        user_header=header,
        missing_user=p.choice(data, "missing_user", w, ("reject", "shared"), d.missing_user),
    )
    if not settings.enabled:
        return settings, []
    return settings, rules or [DEFAULT_RULE]


def rule(
    p: _Parser, data: Mapping[str, Any], where: str, override: Mapping[str, Any], override_where: str
) -> RateRule:
    p.check_keys(
        data,
        where,
        {"name", "methods", "paths", "per_user", "per_environment", "max_wait", "max_in_flight"},
    )
    name = p.get(data, "name", where, str, "", "a rule name")
    if not name:
        raise p.error(f"{where}.name", "missing: every rule needs a name")
    methods = [m.upper() for m in p.strings(data, "methods", where)] or ["POST"]
    paths = p.strings(data, "paths", where)
    if not paths:
        raise p.error(f"{where}.paths", "missing: list the paths this rule limits")
    for i, path in enumerate(paths):
        if not path.startswith("/") or "*" in path[:-1]:
            raise p.expected(f"{where}.paths[{i}]", 'a path like "/v1/x" or "/v1/*"', path)

    def source(key: str) -> tuple[Mapping[str, Any], str]:
        # An environment's override is reported at its own field path and line.
        return (override, override_where) if key in override else (data, where)

    wait_data, wait_where = source("max_wait")
    return RateRule(
        name=name,
        methods=frozenset(methods),
        paths=tuple(paths),
        per_user=rate(p, "per_user", *source("per_user")),
        per_environment=rate(p, "per_environment", *source("per_environment")),
        max_wait=p.number(wait_data, "max_wait", wait_where, default_of(RateRule, "max_wait")),
        max_in_flight=max_in_flight(p, *source("max_in_flight")),
    )


def max_in_flight(p: _Parser, data: Mapping[str, Any], where: str) -> int | None:
    if "max_in_flight" not in data:
        return None
    value = p.integer(data, "max_in_flight", where, 0, minimum=1)
    if value > MAX_IN_FLIGHT:
        raise p.expected(join_field(where, "max_in_flight"), f"an integer from 1 to {MAX_IN_FLIGHT}", value)
    return value


def rate(p: _Parser, key: str, data: Mapping[str, Any], where: str) -> Rate | None:
    value = data.get(key)
    if value is None:
        return None
    what = '"N/second", "N/minute", "N/hour" or "N/day"'
    found = isinstance(value, str) and re.fullmatch(r"\s*(\d+)\s*/\s*(second|minute|hour|day)s?\s*", value)
    if not found or int(found.group(1)) < 1:
        raise p.expected(join_field(where, key), what, value)
    unit = found.group(2)
    return Rate(int(found.group(1)), PERIODS[unit], unit)
