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

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skyproxy.audit.costs import Costs
from skyproxy.audit.summary import audit_files, prediction_events
from skyproxy.budgets.periods import PERIODS, Period, window

NANOS = 1_000_000_000
REMEMBERED_PREDICTIONS = 100_000  # creates whose estimate a later terminal line replaces


def nanos(usd: float) -> int:
    return round(usd * NANOS)


Cell = tuple[str, "str | None", "str | None"]  # (environment, userId, client)


# Where a line's cost counts: (timestamp, environment, userId, client). A plain tuple:
# one is made for every audit line, and a NamedTuple costs several times as much to build.
Place = tuple[float, str, "str | None", "str | None"]


@dataclass(slots=True)
class Window:
    """One period kind's current window and the spend of each cell in it."""

    start: float
    end: float
    spent: dict[Cell, int] = field(default_factory=dict)


class Ledger:
    """Spend per cell in the current window of each period kind."""

    def __init__(self, clock: Callable[[], float] = time.time, periods: Iterable[Period] = PERIODS) -> None:
        self.clock = clock
        # No totals: only the changes are read, so lines without a prediction id are not kept.
        self.costs: Costs[Place] = Costs(limit=REMEMBERED_PREDICTIONS, totals=False)
        self.windows: dict[Period, Window] = {}
        self._spans: tuple[Window, ...] = ()  # the windows, for the loop every line takes
        self.epoch = 0  # counts rolls, so that views built on the windows know to rebuild
        self.next_end = math.inf  # the end of the first window to roll
        self.replayed = False  # whether the audit files were read in
        for period in periods:
            self.keep(period)

    def keep(self, period: Period) -> None:
        """Counts spend per `period` too (the budgets use it), from now on."""
        if period not in self.windows:
            self.windows[period] = Window(*window(period, self.clock()))
            self._rolled()

    def advance(self, now: float) -> None:
        """Rolls every window that `now` has passed: forward only, never back."""
        if now < self.next_end:
            return
        for period, found in self.windows.items():
            if now >= found.end:
                self.windows[period] = Window(*window(period, now))
        self._rolled()

    def _rolled(self) -> None:
        self._spans = tuple(self.windows.values())
        self.next_end = min(w.end for w in self._spans)
        self.epoch += 1

    def current(self, period: Period, now: float | None = None) -> Window:
        """The period's window as of `now` (default: the clock)."""
        self.advance(self.clock() if now is None else now)
        return self.windows[period]

    def observe(
        self,
        timestamp: float,
        environment: str,
        user: str | None,
        client: str | None,
        status: str,
        prediction_id: str | None,
        cost: float | None,
        now: float | None = None,
    ) -> list[tuple[Place, int]]:
        """Takes one audit record in; returns the (place, nano-dollars) changes it made.

        `now` is the clock's time when the caller has just read it."""
        found = self.costs.observe((timestamp, environment, user, client), status, prediction_id, cost)
        if not found:
            return []
        if now is None:
            now = self.clock()
        if timestamp > now:
            now = timestamp
        if now >= self.next_end:
            self.advance(now)
        return [(where, self.count(where, usd)) for where, usd in found]

    def count(self, where: Place, usd: float) -> int:
        """One change of `costs`, added to each window that holds its moment (advanced to
        now by the caller); returns it in nano-dollars."""
        amount = round(usd * NANOS)
        moment, environment, user, client = where
        self.add(moment, (environment, user, client), amount)
        return amount

    def add(self, moment: float, cell: Cell, amount: int) -> None:
        """`amount` nano-dollars spent at `moment`, into each window that holds it."""
        for current in self._spans:
            if current.start <= moment < current.end:
                spent = current.spent
                spent[cell] = spent.get(cell, 0) + amount

    def replay(self, audit_path: Path) -> int:
        """Feeds in every line of the current windows from the audit files; blocking.

        Files last written before the earliest window are skipped unread. Returns the
        number of lines taken in.
        """
        now = self.clock()
        self.advance(now)
        since = min((w.start for w in self.windows.values()), default=now)
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
