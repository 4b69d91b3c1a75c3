"""Spend in the current day, week and month, folded from audit records as they are written.

The ledger sees exactly the lines the audit trail holds: each accepted record live, and
at start every line of the current periods replayed from the audit files. So spend
after a restart, SIGKILL included, is what the files show, and the spend rule is the
audit summary's own (`skyproxy.audit.costs`). Amounts are kept in whole nano-dollars,
so that adding an estimate and later taking it back leaves exactly nothing.

Spend is held per (environment, user, client) cell, whatever the budgets are, so a
reload that changes the budgets recomputes their totals from memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from skyproxy.audit.costs import Costs
from skyproxy.audit.summary import audit_files, prediction_events
from skyproxy.budgets.periods import PERIODS, Period, window

NANOS = 1_000_000_000
REMEMBERED_PREDICTIONS = 100_000  # creates whose estimate a later terminal line replaces


def nanos(usd: float) -> int:
    return round(usd * NANOS)


Cell = tuple[str, "str | None", "str | None"]  # (environment, userId, client)


class Place(NamedTuple):
    """Where a line's cost counts: when, and for whom."""

    timestamp: float
    environment: str
    user: str | None
    client: str | None


@dataclass(slots=True)
class Window:
    """One period kind's current window and the spend of each cell in it."""

    start: float
    end: float
    spent: dict[Cell, int] = field(default_factory=dict)


class Ledger:
    """Spend per cell in the current window of each period kind."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.costs: Costs[Place] = Costs(limit=REMEMBERED_PREDICTIONS)
        now = clock()
        self.windows: dict[Period, Window] = {p: Window(*window(p, now)) for p in PERIODS}
        self.replayed = False  # whether the audit files were read in

    def current(self, period: Period, now: float | None = None) -> Window:
        """The period's window as of `now` (default: the clock); rolls forward, never back."""
        found = self.windows[period]
        moment = self.clock() if now is None else now
        if moment >= found.end:
            found = self.windows[period] = Window(*window(period, moment))
        return found

    def observe(
        self,
        timestamp: float,
        environment: str,
        user: str | None,
        client: str | None,
        status: str,
        prediction_id: str | None,
        cost: float | None,
    ) -> list[tuple[Place, int]]:
        """Takes one audit record in; returns the (place, nano-dollars) changes it made."""
        place = Place(timestamp, environment, user, client)
        changes = [
            (where, nanos(usd)) for where, usd in self.costs.observe(place, status, prediction_id, cost)
        ]
        now = max(self.clock(), timestamp)
        for period in PERIODS:
            current = self.current(period, now)
            for where, amount in changes:
                if current.start <= where.timestamp < current.end:
                    cell = (where.environment, where.user, where.client)
                    current.spent[cell] = current.spent.get(cell, 0) + amount
        return changes

    def replay(self, audit_path: Path) -> int:
        """Feeds in every line of the current windows from the audit files; blocking.

        Files last written before the earliest window are skipped unread. Returns the
        number of lines taken in.
        """
        now = self.clock()
        since = min(self.current(p, now).start for p in PERIODS)
        taken = 0
        for line in prediction_events(_recent(audit_files(audit_path), since)):
            moment = line["timestamp"].timestamp()
            if moment < since:
                continue
            self.observe(
                moment,
                line["environment"],
                line["userId"],
                _client(line),
                line["status"],
                line["predictionId"],
                line["costUsd"],
            )
            taken += 1
        self.replayed = True
        return taken


def _recent(files: Iterable[Path], since: float) -> Iterator[Path]:
    for path in files:
        try:
            if os.stat(path).st_mtime >= since:
                yield path
        except FileNotFoundError:  # rotated away since it was listed
            continue


def _client(line: dict[str, Any]) -> str | None:
    client = line.get("client")
    return client if isinstance(client, str) else None
