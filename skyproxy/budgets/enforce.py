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
from skyproxy.budgets.hold import EMPTY, NO_HOLD, Hold, Holds, Subject
from skyproxy.budgets.ledger import NANOS, Ledger, Place, nanos
from skyproxy.budgets.periods import iso
from skyproxy.budgets.rule import Rule
from skyproxy.budgets.shared import SharedHold, period_label, subject_key
from skyproxy.cluster.backend import BudgetBackend, BudgetScope
from skyproxy.config import Budget

log = logging.getLogger("skyproxy.budgets")
REMEMBERED_AMOUNTS = 256  # dollar amounts kept converted: the prices of a few models


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


class Budgets:
    """Every budget's spend and reservations; one instance for the life of the process."""

    def __init__(self, budgets: tuple[Budget, ...], clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.ledger = Ledger(clock, {b.period for b in budgets})
        self.warnings: dict[str, int] = {}  # crossings of warn_at, per budget
        self._budgets: tuple[Budget, ...] = ()
        self._rules: tuple[Rule, ...] = ()
        self._by_env: dict[str, tuple[Rule, ...]] = {}
        self._solo: dict[str, Rule] = {}  # environments with exactly one budget: admit()'s own path
        self._epoch = -1
        self.shared: BudgetBackend | None = None  # with [cluster]: spend and reservations on Redis
        self._nanos: dict[float, int] = {}  # estimates in nano-dollars, by their amount in dollars
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
        # A budget kept by name keeps its accounts: the holds in flight release into them.
        kept = {rule.name: rule.accounts for rule in self._rules}
        self._rules = tuple(Rule(b, kept.get(b.name, {})) for b in budgets)
        self._by_env = {}
        self._solo = {}
        self._epoch = -1  # rebuild every rule's spend at the next use

    def applies(self, environment: str) -> bool:
        return bool(self._for(environment))

    def _for(self, environment: str) -> tuple[Rule, ...]:
        found = self._by_env.get(environment)
        if found is None:
            found = self._by_env[environment] = tuple(
                r for r in self._rules if r.budget.applies_to(environment)
            )
            if len(found) == 1:
                self._solo[environment] = found[0]
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
            if rule.start != current.start:
                rule.recount(current)

    # -- the hot path ---------------------------------------------------------------------
    def admit(
        self, environment: str, user: str | None, client: str | None, estimate_usd: float
    ) -> Hold | Exceeded:
        """Reserves the estimate under every budget that applies, or says which one it would pass."""
        rule = self._solo.get(environment)
        if rule is None:  # no budget, several, or an environment not seen since the last reload
            return self._admit_all(environment, user, client, estimate_usd)
        now = self.clock()  # _prepare(), unrolled for the usual case
        ledger = self.ledger
        if now >= ledger.next_end or ledger.epoch != self._epoch:
            self._sync(now)
        estimate = self._nanos.get(estimate_usd)
        if estimate is None:
            estimate = self._nanos_of(estimate_usd)
        per = rule.per
        subject = user if per == "user" else client if per == "client" else environment
        account = rule.accounts.get(subject, EMPTY)
        if account.spent + account.reserved + estimate > rule.limit:
            return self._exceeded(rule, account.spent, account.reserved, now)
        if not estimate:
            return NO_HOLD
        holds = account.holds
        held = None if holds is None else holds.get(estimate)
        if held is None:  # the first reservation of this amount here (EMPTY has no holds)
            return rule.account(subject).hold(estimate)
        account.reserved += estimate
        return held

    def _admit_all(
        self, environment: str, user: str | None, client: str | None, estimate_usd: float
    ) -> Hold | Exceeded:
        rules = self._for(environment)
        if len(rules) == 1:
            return self.admit(environment, user, client, estimate_usd)
        if not rules:
            return NO_HOLD
        now, estimate = self._prepare(estimate_usd)
        subjects = []
        for rule in rules:
            subject = rule.subject(environment, user, client)
            account = rule.accounts.get(subject, EMPTY)
            if account.spent + account.reserved + estimate > rule.limit:
                return self._exceeded(rule, account.spent, account.reserved, now)
            subjects.append(subject)
        if not estimate:
            return NO_HOLD
        pairs = zip(rules, subjects, strict=True)
        return Holds([rule.account(subject).hold(estimate) for rule, subject in pairs])

    def _prepare(self, estimate_usd: float) -> tuple[float, int]:
        """The clock's time, the windows brought to it, and the estimate in nano-dollars."""
        now = self.clock()
        ledger = self.ledger
        if now >= ledger.next_end or ledger.epoch != self._epoch:
            self._sync(now)
        estimate = self._nanos.get(estimate_usd)
        return now, self._nanos_of(estimate_usd) if estimate is None else estimate

    def _nanos_of(self, usd: float) -> int:
        """An amount in nano-dollars; the few that recur (prices) are remembered."""
        found = round(usd * NANOS) if usd > 0 else 0
        if len(self._nanos) >= REMEMBERED_AMOUNTS:
            self._nanos.clear()
        self._nanos[usd] = found
        return found

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
        rules: tuple[Rule, ...],
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

    def _scope(self, rule: Rule, subject: Subject) -> BudgetScope:
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
        ledger = self.ledger
        # Rolled first, so that a change is added once. A line is counted in the window
        # that holds its timestamp, so only that rolls the windows here; the clock rolls
        # them at the next admission.
        if timestamp >= ledger.next_end or ledger.epoch != self._epoch:
            self._sync(max(timestamp, self.clock()))
        place = (timestamp, environment, user, client)
        costs = ledger.costs
        if (
            status == "created"
            and cost is not None
            and cost > 0
            and prediction_id is not None
            and costs.first_estimate(place, prediction_id, cost)
        ):  # the line every create writes: its estimate is its one change
            amount = self._nanos.get(cost)
            if amount is None:
                amount = self._nanos_of(cost)
            ledger.add(timestamp, (environment, user, client), amount)
            self._spend(timestamp, environment, user, client, amount)
        else:  # the ledger's observe() unrolled: each change to the cells and the subjects
            for where, usd in costs.observe(place, status, prediction_id, cost):
                self._spend(*where, ledger.count(where, usd))
        shared = self.shared
        if shared is not None and cost is not None:
            self._share(shared, place, status, prediction_id, cost)

    def _spend(
        self, moment: float, environment: str, user: str | None, client: str | None, amount: int
    ) -> None:
        """One change of spend, added to each budget whose current window holds its moment."""
        rules = self._by_env.get(environment)
        for rule in self._for(environment) if rules is None else rules:
            if rule.start <= moment < rule.end:
                per = rule.per
                subject = user if per == "user" else client if per == "client" else environment
                account = rule.accounts.get(subject)
                if account is None:
                    account = rule.account(subject)
                spent = account.spent = account.spent + amount
                if rule.warn is not None and amount > 0 and spent >= rule.warn and subject not in rule.warned:
                    self._warn(rule, subject, spent)

    def _warn(self, rule: Rule, subject: Subject, spent: int) -> None:
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

    def _exceeded(self, rule: Rule, spent: int, reserved: int, now: float) -> Exceeded:
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
            current = self.ledger.windows[rule.period]
            resets_at = iso(current.end)
            # Subjects with spend lines in the window (at $0 too) or a reservation: not those
            # whose account is only left from a reservation given back.
            applies_to = rule.budget.applies_to
            shown = {rule.subject(*cell) for cell in current.spent if applies_to(cell[0])}
            shown.update(subject for subject, a in rule.accounts.items() if a.reserved)
            for subject in sorted(shown, key=lambda s: (s is None, s or "")):
                account = rule.accounts.get(subject, EMPTY)
                rows.append(
                    {
                        "budget": rule.name,
                        "per": rule.per,
                        "subject": subject,
                        "period": rule.period,
                        "spent_usd": round(account.spent / NANOS, 9),
                        "reserved_usd": round(account.reserved / NANOS, 9),
                        "limit_usd": rule.budget.usd,
                        "resets_at": resets_at,
                    }
                )
        return rows
