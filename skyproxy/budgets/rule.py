"""One budget as admission and the audit's lines read it: its limit, its current window,
and an account per subject."""

from __future__ import annotations

import math

from skyproxy.budgets.hold import Account, Subject
from skyproxy.budgets.ledger import Window, nanos
from skyproxy.config import Budget


class Rule:
    """One budget as the hot path reads it, with its spend in the current window."""

    __slots__ = (
        "accounts",
        "budget",
        "end",
        "limit",
        "name",
        "per",
        "period",
        "start",
        "warn",
        "warned",
    )

    def __init__(self, budget: Budget, accounts: dict[Subject, Account]) -> None:
        self.budget = budget
        self.name = budget.name
        self.per = budget.per
        self.period = budget.period
        self.limit = nanos(budget.usd)
        self.warn = None if budget.warn_at is None else nanos(budget.usd * budget.warn_at)
        self.start = -math.inf  # of the window `spent` counts; rebuilt when the ledger rolls
        self.end = -math.inf
        # Per subject: spend in the window, and what admitted creates hold until they end.
        self.accounts = accounts
        self.warned: set[Subject] = set()

    def account(self, subject: Subject) -> Account:
        found = self.accounts.get(subject)
        if found is None:
            found = self.accounts[subject] = Account()
        return found

    def recount(self, current: Window) -> None:
        """Spend from the ledger's cells for a new window; reservations carry over."""
        self.start, self.end = current.start, current.end
        self.warned = set()
        # Accounts nothing is held in are dropped, so subjects of past windows are not kept.
        self.accounts = accounts = {s: a for s, a in self.accounts.items() if a.reserved}
        for held in accounts.values():
            held.spent = 0
        applies_to = self.budget.applies_to
        for (environment, user, client), amount in current.spent.items():
            if applies_to(environment):
                self.account(self.subject(environment, user, client)).spent += amount

    def subject(self, environment: str, user: str | None, client: str | None) -> Subject:
        per = self.per
        return user if per == "user" else client if per == "client" else environment
