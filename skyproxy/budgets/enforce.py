"""Budgets enforced: spent plus reserved plus this create's estimate may not pass the limit.

`admit()` runs before a create is forwarded. It either refuses with `Exceeded`, or
reserves the estimate against every budget that applies and returns a `Hold`. The hold
is released when the exchange ends, however it ends; on success the audit record has
by then turned the estimate into spend (`record()`), in the same step on the event
loop, so a create is never counted twice or not at all. Parallel creates each reserve
synchronously, so together they cannot overshoot.

With no budget configured nothing is ever refused, and `admit()` costs one dict lookup.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from skyproxy.budgets.ledger import NANOS, Ledger, Place, nanos
from skyproxy.budgets.periods import iso
from skyproxy.config import Budget

log = logging.getLogger("skyproxy.budgets")

Subject = str | None


@dataclass(frozen=True, slots=True)
class Exceeded:
    """Why a create is refused: the first budget it would pass."""

    budget: str
    period: str
    limit_usd: float
    spent_usd: float
    reserved_usd: float
    resets_at: str  # ISO 8601, UTC
    retry_after: int  # whole seconds until the period resets, at least 1

    def fields(self) -> dict[str, object]:
        return {
            "budget": self.budget,
            "limit_usd": self.limit_usd,
            "spent_usd": self.spent_usd,
            "reserved_usd": self.reserved_usd,
            "resets_at": self.resets_at,
        }


class Hold:
    """Reserved nano-dollars against some budgets; `release()` gives them back, once."""

    __slots__ = ("_amounts", "_reserved")

    def __init__(
        self, reserved: dict[tuple[str, Subject], int], amounts: list[tuple[str, Subject]], each: int
    ):
        self._reserved = reserved
        self._amounts = [(key, each) for key in amounts] if each else []

    def release(self) -> None:
        amounts, self._amounts = self._amounts, []
        for key, amount in amounts:
            left = self._reserved[key] - amount
            if left:
                self._reserved[key] = left
            else:
                del self._reserved[key]


NO_HOLD = Hold({}, [], 0)


@dataclass(slots=True)
class _Tally:
    start: float
    spent: dict[Subject, int] = field(default_factory=dict)
    warned: set[Subject] = field(default_factory=set)


def subject_of(budget: Budget, environment: str, user: str | None, client: str | None) -> Subject:
    if budget.per == "user":
        return user
    if budget.per == "client":
        return client
    return environment


class Budgets:
    """Every budget's spend and reservations; one instance for the life of the process."""

    def __init__(self, budgets: tuple[Budget, ...], clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.ledger = Ledger(clock)
        self.warnings: dict[str, int] = {}  # crossings of warn_at, per budget
        self._reserved: dict[tuple[str, Subject], int] = {}
        self._budgets: tuple[Budget, ...] = ()
        self._by_env: dict[str, tuple[Budget, ...]] = {}
        self._tallies: dict[str, _Tally] = {}
        self.reconfigure(budgets)

    @property
    def budgets(self) -> tuple[Budget, ...]:
        return self._budgets

    def reconfigure(self, budgets: tuple[Budget, ...]) -> None:
        """New budget definitions; their spend is recomputed from the ledger, in memory."""
        if budgets == self._budgets:
            return
        self._budgets = budgets
        self._by_env = {}
        self._tallies = {}
        names = {b.name for b in budgets}
        self._reserved = {k: v for k, v in self._reserved.items() if k[0] in names}

    def applies(self, environment: str) -> bool:
        return bool(self._for(environment))

    def _for(self, environment: str) -> tuple[Budget, ...]:
        found = self._by_env.get(environment)
        if found is None:
            found = self._by_env[environment] = tuple(b for b in self._budgets if b.applies_to(environment))
        return found

    # -- the hot path ---------------------------------------------------------------------
    def admit(
        self, environment: str, user: str | None, client: str | None, estimate_usd: float
    ) -> Hold | Exceeded:
        """Reserves the estimate under every budget that applies, or says which one it would pass."""
        budgets = self._for(environment)
        if not budgets:
            return NO_HOLD
        now = self.clock()
        estimate = max(nanos(estimate_usd), 0)
        keys: list[tuple[str, Subject]] = []
        for budget in budgets:
            subject = subject_of(budget, environment, user, client)
            tally = self._tally(budget, now)
            key = (budget.name, subject)
            spent = tally.spent.get(subject, 0)
            reserved = self._reserved.get(key, 0)
            if spent + reserved + estimate > nanos(budget.usd):
                return self._exceeded(budget, spent, reserved, now)
            keys.append(key)
        if estimate:
            for key in keys:
                self._reserved[key] = self._reserved.get(key, 0) + estimate
        return Hold(self._reserved, keys, estimate)

    def record(
        self,
        timestamp: float,
        environment: str,
        user: str | None,
        client: str | None,
        status: str,
        prediction_id: str | None,
        cost: float | None,
    ) -> None:
        """Takes in an audit record as it is written: spend moves by the spend rule."""
        now = max(self.clock(), timestamp)
        for budget in self._budgets:
            self._tally(budget, now)  # roll first, so the change below is added once
        changes = self.ledger.observe(timestamp, environment, user, client, status, prediction_id, cost)
        for place, amount in changes:
            for budget in self._for(place.environment):
                self._add(budget, place, amount)

    def _add(self, budget: Budget, place: Place, amount: int) -> None:
        current = self.ledger.windows[budget.period]
        if not current.start <= place.timestamp < current.end:
            return
        tally = self._tallies[budget.name]
        subject = subject_of(budget, place.environment, place.user, place.client)
        spent = tally.spent[subject] = tally.spent.get(subject, 0) + amount
        if amount > 0 and subject not in tally.warned:
            self._warn(budget, tally, subject, spent)

    def _warn(self, budget: Budget, tally: _Tally, subject: Subject, spent: int) -> None:
        if budget.warn_at is None or spent < nanos(budget.usd * budget.warn_at):
            return
        tally.warned.add(subject)  # once per subject and period: a new period has a new tally
        self.warnings[budget.name] = self.warnings.get(budget.name, 0) + 1
        log.warning(
            "budget %s: %s %s has spent $%.4f of $%.2f this %s (warn_at %g)",
            budget.name,
            budget.per,
            subject,
            spent / NANOS,
            budget.usd,
            budget.period,
            budget.warn_at,
        )

    def _tally(self, budget: Budget, now: float) -> _Tally:
        current = self.ledger.current(budget.period, now)
        tally = self._tallies.get(budget.name)
        if tally is None or tally.start != current.start:
            tally = self._tallies[budget.name] = _Tally(current.start)
            for (environment, user, client), amount in current.spent.items():
                if budget.applies_to(environment):
                    subject = subject_of(budget, environment, user, client)
                    tally.spent[subject] = tally.spent.get(subject, 0) + amount
        return tally

    def _exceeded(self, budget: Budget, spent: int, reserved: int, now: float) -> Exceeded:
        end = self.ledger.windows[budget.period].end
        return Exceeded(
            budget=budget.name,
            period=budget.period,
            limit_usd=budget.usd,
            spent_usd=round(spent / NANOS, 9),
            reserved_usd=round(reserved / NANOS, 9),
            resets_at=iso(end),
            retry_after=max(1, math.ceil(end - now)),
        )

    # -- reading ----------------------------------------------------------------------------
    def snapshot(self) -> list[dict[str, Any]]:
        """Per budget and subject: spent, reserved, limit and reset time, for `budget show`."""
        now = self.clock()
        rows: list[dict[str, Any]] = []
        for budget in self._budgets:
            tally = self._tally(budget, now)
            subjects = set(tally.spent) | {s for (name, s) in self._reserved if name == budget.name}
            resets_at = iso(self.ledger.windows[budget.period].end)
            for subject in sorted(subjects, key=lambda s: (s is None, s or "")):
                rows.append(
                    {
                        "budget": budget.name,
                        "per": budget.per,
                        "subject": subject,
                        "period": budget.period,
                        "spent_usd": round(tally.spent.get(subject, 0) / NANOS, 9),
                        "reserved_usd": round(self._reserved.get((budget.name, subject), 0) / NANOS, 9),
                        "limit_usd": budget.usd,
                        "resets_at": resets_at,
                    }
                )
        return rows
