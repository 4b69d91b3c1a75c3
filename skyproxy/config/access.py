"""Who may spend, and how much: the `[tokens]` and `[[budgets]]` tables.

Kept apart from the parser's core tables; each function takes the parser for its typed
getters, so errors carry the same file, line and field path.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from skyproxy.config.settings import DEFAULT_TOKENS_PATH, Budget, TokensSettings

if TYPE_CHECKING:
    from skyproxy.config.parser import _Parser

MAX_BUDGET_USD = 1_000_000_000.0
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def tokens(p: _Parser, data: dict[str, Any]) -> TokensSettings:
    p.check_keys(data, "tokens", {"file"})
    raw = p.get(data, "file", "tokens", str, DEFAULT_TOKENS_PATH, "a file path")
    if not raw:
        raise p.expected("tokens.file", "a file path", raw)
    return TokensSettings(path=p.file_path(raw, "tokens.file"))


def budgets(p: _Parser, data: dict[str, Any], environments: set[str]) -> tuple[Budget, ...]:
    """Every `[[budgets]]` entry, checked; names are unique, environments must exist."""
    raw = p.get(data, "budgets", "", list, [], "an array of tables [[budgets]]")
    result: list[Budget] = []
    for i, entry in enumerate(raw):
        where = f"budgets[{i}]"
        if not isinstance(entry, dict):
            raise p.expected(where, "a table", entry)
        budget = _budget(p, entry, where, environments)
        if any(b.name == budget.name for b in result):
            # Spend is shown and reported by budget name, so names must be unique.
            raise p.error(f"{where}.name", f"duplicate budget name {budget.name!r}")
        result.append(budget)
    return tuple(result)


def _budget(p: _Parser, data: dict[str, Any], where: str, environments: set[str]) -> Budget:
    p.check_keys(data, where, {"name", "per", "usd", "period", "environments", "warn_at"})
    for required in ("name", "per", "usd", "period"):
        if required not in data:
            raise p.error(where, f"missing: every budget needs {required} =")
    name = p.get(data, "name", where, str, "", "a budget name")
    if not _NAME.fullmatch(name):
        raise p.expected(f"{where}.name", "a name of letters, digits, '.', '-' and '_'", name)
    usd = p.number(data, "usd", where, 0.0, minimum=0, maximum=MAX_BUDGET_USD)
    names = p.strings(data, "environments", where) if "environments" in data else None
    for j, env in enumerate(names or ()):
        if env not in environments:
            raise p.error(f"{where}.environments[{j}]", f"no environment named {env!r}")
    if names is not None and not names:
        raise p.error(f"{where}.environments", "empty: list environments, or leave the key out for all")
    warn_at = p.number(data, "warn_at", where, 1.0, minimum=0, maximum=1) if "warn_at" in data else None
    return Budget(
        name=name,
        per=p.choice(data, "per", where, ("user", "client", "environment"), "user"),
        usd=usd,
        period=p.choice(data, "period", where, ("day", "week", "month"), "day"),
        environments=None if names is None else frozenset(names),
        warn_at=warn_at,
    )
