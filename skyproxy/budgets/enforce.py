"""Budgets enforced: spent plus reserved plus this create's estimate may not pass the limit.

`admit()` runs before a create is forwarded. It either refuses with `Exceeded`, or
reserves the estimate against every budget that applies and returns a `Hold`. The hold
is released when the exchange ends, however it ends; on success the audit record has
by then turned the estimate into spend (`record()`), in the same step on the event
loop, so a create is never counted twice or not at all. Parallel creates each reserve
synchronously, so together they cannot overshoot.

With no budget configured nothing is ever refused, and `admit()` costs one dict lookup.

With [cluster], `shared` is the cluster's `BudgetBackend` and the handler awaits
`admit_shared()` instead: spend and reservations then live on Redis, so a budget holds
across replicas. A reservation is taken there atomically against every budget; each
spend change an audit line makes is queued to Redis ahead of the release of the
reservation it replaces, and both reach Redis in one transaction (cluster/batch.py).
A prediction's terminal cost replaces its estimate on Redis even when another replica
took the estimate. warn_at is also checked on the shared spend Redis reports as a
create is admitted. The local ledger still follows this replica's own lines, for
`/-/budgets`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from skyproxy.audit.record import TERMINAL
from skyproxy.budgets.hold import NO_HOLD, Hold, Holds, Subject
from skyproxy.budgets.ledger import NANOS, Ledger, Place, nanos
from skyproxy.budgets.periods import iso
from skyproxy.budgets.shared import SharedHold, period_label, subject_key
from skyproxy.cluster.backend import BudgetBackend, BudgetScope
from skyproxy.config import Budget

log = logging.getLogger("skyproxy.budgets")


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


def subject_of(budget: Budget, environment: str, user: str | None, client: str | None) -> Subject:
    if budget.per == "user":
        return user
    if budget.per == "client":
        return client
    return environment


class _Rule:
    """One budget as the hot path reads it, with its spend in the current window."""

    __slots__ = (
        "budget",
        "end",
        "limit",
        "name",
        "per",
        "period",
        "reserved",
        "spent",
        "start",
        "warn",
        "warned",
    )

    def __init__(self, budget: Budget, reserved: dict[Subject, int]) -> None:
        self.budget = budget
        self.name = budget.name
        self.per = budget.per
        self.period = budget.period
        self.limit = nanos(budget.usd)
        self.warn = None if budget.warn_at is None else nanos(budget.usd * budget.warn_at)
        self.start = -math.inf  # of the window `spent` counts; rebuilt when the ledger rolls
        self.end = -math.inf
        self.spent: dict[Subject, int] = {}
        self.reserved = reserved  # what admitted creates hold until they end, per subject
        self.warned: set[Subject] = set()

    def subject(self, environment: str, user: str | None, client: str | None) -> Subject:
        per = self.per
        return user if per == "user" else client if per == "client" else environment


class Budgets:
    """Every budget's spend and reservations; one instance for the life of the process."""

    def __init__(self, budgets: tuple[Budget, ...], clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.ledger = Ledger(clock, {b.period for b in budgets})
        self.warnings: dict[str, int] = {}  # crossings of warn_at, per budget
        self._budgets: tuple[Budget, ...] = ()
        self._rules: tuple[_Rule, ...] = ()
        self._by_env: dict[str, tuple[_Rule, ...]] = {}
        self._epoch = -1
        self.shared: BudgetBackend | None = None  # with [cluster]: spend and reservations on Redis
        self.reconfigure(budgets)

    @property
    def budgets(self) -> tuple[Budget, ...]:
        return self._budgets

    def reconfigure(self, budgets: tuple[Budget, ...]) -> None:
        """New budget definitions; their spend is recomputed from the ledger, in memory."""
        if budgets == self._budgets:
            return
        self._budgets = budgets
        for budget in budgets:
            self.ledger.keep(budget.period)
        # A budget kept by name keeps its reservations: the holds in flight release into them.
        kept = {rule.name: rule.reserved for rule in self._rules}
        self._rules = tuple(_Rule(b, kept.get(b.name, {})) for b in budgets)
        self._by_env = {}
        self._epoch = -1  # rebuild every rule's spend at the next use

    def applies(self, environment: str) -> bool:
        return bool(self._for(environment))

    def _for(self, environment: str) -> tuple[_Rule, ...]:
        found = self._by_env.get(environment)
        if found is None:
            found = self._by_env[environment] = tuple(
                r for r in self._rules if r.budget.applies_to(environment)
            )
        return found

    def _sync(self, now: float) -> None:
        """Brings the ledger to `now`; after a roll, each rule recounts its window from the cells."""
        ledger = self.ledger
        if now < ledger.next_end and ledger.epoch == self._epoch:
            return  # the common case, decided in two compares
        ledger.advance(now)
        self._epoch = ledger.epoch
        for rule in self._rules:
            current = ledger.windows[rule.period]
            if rule.start == current.start:
                continue
            rule.start, rule.end = current.start, current.end
            rule.spent = {}
            rule.warned = set()
            for (environment, user, client), amount in current.spent.items():
                if rule.budget.applies_to(environment):
                    subject = rule.subject(environment, user, client)
                    rule.spent[subject] = rule.spent.get(subject, 0) + amount

    # -- the hot path ---------------------------------------------------------------------
    def admit(
        self, environment: str, user: str | None, client: str | None, estimate_usd: float
    ) -> Hold | Exceeded:
        """Reserves the estimate under every budget that applies, or says which one it would pass."""
        rules = self._by_env.get(environment)
        if rules is None:
            rules = self._for(environment)
        if not rules:
            return NO_HOLD
        now = self.clock()
        ledger = self.ledger
        if now >= ledger.next_end or ledger.epoch != self._epoch:
            self._sync(now)
        estimate = round(estimate_usd * NANOS) if estimate_usd > 0 else 0
        if len(rules) == 1:  # the usual case, without the lists
            rule = rules[0]
            per = rule.per
            subject = user if per == "user" else client if per == "client" else environment
            spent = rule.spent.get(subject, 0)
            reserved = rule.reserved
            held = reserved.get(subject, 0)
            if spent + held + estimate > rule.limit:
                return self._exceeded(rule, spent, held, now)
            if not estimate:
                return NO_HOLD
            reserved[subject] = held + estimate
            return Hold(reserved, subject, estimate)
        subjects: list[Subject] = []
        for rule in rules:
            per = rule.per
            subject = user if per == "user" else client if per == "client" else environment
            spent = rule.spent.get(subject, 0)
            held = rule.reserved.get(subject, 0)
            if spent + held + estimate > rule.limit:
                return self._exceeded(rule, spent, held, now)
            subjects.append(subject)
        if not estimate:
            return NO_HOLD
        holds = []
        for rule, subject in zip(rules, subjects, strict=True):
            rule.reserved[subject] = rule.reserved.get(subject, 0) + estimate
            holds.append(Hold(rule.reserved, subject, estimate))
        return Holds(holds)

    async def admit_shared(
        self, environment: str, user: str | None, client: str | None, estimate_usd: float
    ) -> Hold | Exceeded:
        """`admit()` across replicas, on `shared`; raises `ClusterUnavailable` under
        on_error = "closed" when Redis does not answer, and admits under "open"."""
        backend = self.shared
        assert backend is not None
        rules = self._for(environment)
        if not rules:
            return NO_HOLD
        now = self.clock()
        self._sync(now)
        scopes = [self._scope(rule, rule.subject(environment, user, client)) for rule in rules]
        decision = await backend.reserve(scopes, estimate_usd if estimate_usd > 0 else 0.0)
        if decision.admitted:
            self._warn_shared(rules, decision.spent_by_scope, environment, user, client)
            reservation = decision.reservation
            return NO_HOLD if reservation is None else SharedHold(backend, reservation)
        assert decision.refused_by is not None
        rule = rules[decision.refused_by]
        spent, reserved = nanos(decision.spent_usd), nanos(decision.reserved_usd)
        return self._exceeded(rule, spent, reserved, self.clock())

    def _warn_shared(
        self,
        rules: tuple[_Rule, ...],
        spent_by_scope: tuple[float, ...],
        environment: str,
        user: str | None,
        client: str | None,
    ) -> None:
        """warn_at on the spend of every replica: once per subject and period on this one."""
        for rule, spent_usd in zip(rules, spent_by_scope, strict=False):
            if rule.warn is None:
                continue
            subject = rule.subject(environment, user, client)
            spent = nanos(spent_usd)
            if spent >= rule.warn and subject not in rule.warned:
                self._warn(rule, subject, spent)

    def _scope(self, rule: _Rule, subject: Subject) -> BudgetScope:
        """Where Redis keeps a rule's subject's spend in the rule's current window."""
        current = self.ledger.windows[rule.period]
        label = period_label(rule.period, current.start)
        return BudgetScope(rule.name, subject_key(subject), label, rule.budget.usd, current.end)

    def _share(
        self, backend: BudgetBackend, place: Place, status: str, prediction_id: str | None, cost: float
    ) -> None:
        """Queues one audit line's spend to Redis, by the spend rule of `audit.costs`: a
        prediction's terminal cost replaces its estimate there, whichever replica took it."""
        moment, where, who, client = place
        rules = self._for(where)
        if not rules:
            return
        windows = self.ledger.windows
        scopes = [
            self._scope(rule, rule.subject(where, who, client))
            for rule in rules
            if rule.start <= moment < windows[rule.period].end
        ]
        if prediction_id is None:
            if cost:
                backend.add_soon(scopes, cost)
        elif status == "created" or status in TERMINAL:
            final = status in TERMINAL
            keep_until = max(w.end for w in windows.values())
            # A terminal line with no user bills the creator, as the local tracker does;
            # another replica's tracker does not know the creator, Redis does.
            inherit = final and who is None
            backend.prediction_soon(prediction_id, final, scopes, cost, keep_until, where_estimated=inherit)

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
        """Takes in an audit record as it is written: spend moves by the spend rule.

        With no budget configured nothing is kept: "neither" costs nothing per request."""
        if not self._rules:
            return
        now = self.clock()
        if timestamp > now:
            now = timestamp
        ledger = self.ledger
        if now >= ledger.next_end or ledger.epoch != self._epoch:
            self._sync(now)  # roll first, so that a change is added once
        place = (timestamp, environment, user, client)
        # The ledger's observe() unrolled: the spend rule's changes go to the ledger's cells
        # and to the budgets' subjects in one pass, with no list of changes in between.
        for where, usd in ledger.costs.observe(place, status, prediction_id, cost):
            self._spend(where, ledger.count(where, usd))
        shared = self.shared
        if shared is not None and cost is not None:
            self._share(shared, place, status, prediction_id, cost)

    def _spend(self, where: Place, amount: int) -> None:
        """One change of spend, added to each budget whose current window holds its moment."""
        moment, environment, user, client = where
        rules = self._by_env.get(environment)
        for rule in self._for(environment) if rules is None else rules:
            if rule.start <= moment < rule.end:
                per = rule.per
                subject = user if per == "user" else client if per == "client" else environment
                spent = rule.spent[subject] = rule.spent.get(subject, 0) + amount
                if rule.warn is not None and amount > 0 and spent >= rule.warn and subject not in rule.warned:
                    self._warn(rule, subject, spent)

    def _warn(self, rule: _Rule, subject: Subject, spent: int) -> None:
        rule.warned.add(subject)  # once per subject and period: a new window starts a new set
        self.warnings[rule.name] = self.warnings.get(rule.name, 0) + 1
        budget = rule.budget
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

    def _exceeded(self, rule: _Rule, spent: int, reserved: int, now: float) -> Exceeded:
        end = self.ledger.windows[rule.period].end
        return Exceeded(
            budget=rule.name,
            period=rule.period,
            limit_usd=rule.budget.usd,
            spent_usd=round(spent / NANOS, 9),
            reserved_usd=round(reserved / NANOS, 9),
            resets_at=iso(end),
            retry_after=max(1, math.ceil(end - now)),
        )

    # -- reading ----------------------------------------------------------------------------
    def snapshot(self) -> list[dict[str, Any]]:
        """Per budget and subject: spent, reserved, limit and reset time, for `budget show`."""
        self._sync(self.clock())
        rows: list[dict[str, Any]] = []
        for rule in self._rules:
            subjects = set(rule.spent) | set(rule.reserved)
            resets_at = iso(self.ledger.windows[rule.period].end)
            for subject in sorted(subjects, key=lambda s: (s is None, s or "")):
                rows.append(
                    {
                        "budget": rule.name,
                        "per": rule.per,
                        "subject": subject,
                        "period": rule.period,
                        "spent_usd": round(rule.spent.get(subject, 0) / NANOS, 9),
                        "reserved_usd": round(rule.reserved.get(subject, 0) / NANOS, 9),
                        "limit_usd": rule.budget.usd,
                        "resets_at": resets_at,
                    }
                )
        return rows
