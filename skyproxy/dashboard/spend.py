"""Spend today and this month (UTC), by user, model, client token and environment.

Each prediction is counted once, by the audit trail's spend rule (`Costs`): the cost on
its terminal line, else the estimate on its "created" line. A line moves one total, that
of its cell (environment, user, model, client) on the line's UTC day; the days and
dimensions the page shows are summed from those cells only when it asks, so a line costs
one rule step and one addition.
"""

from __future__ import annotations

import calendar
import time

from skyproxy.audit.costs import Costs

DIMENSIONS = ("user", "model", "client", "environment")
REMEMBERED = 100_000  # predictions whose estimate a later line may replace
TOP = 20  # rows per dimension in a document
DAY = 86400.0

Cell = tuple[str, str | None, str | None, str | None]  # environment, user, model, client
Key = tuple[Cell, float]  # a cell on a day (its start, seconds since the epoch)


def day_start(moment: float) -> float:
    return moment - moment % DAY


def month_start(moment: float) -> float:
    t = time.gmtime(moment)
    return float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))


class Spend:
    def __init__(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._costs: Costs[Key] = Costs(limit=REMEMBERED)
        self._cells: dict[Key, float] = {}
        self._month = month_start(now)
        self._day = day_start(now)

    def observe(
        self,
        moment: float,
        cell: Cell,
        status: str,
        prediction_id: str | None,
        cost: float | None,
    ) -> None:
        """One audit line. A line without a cost changes no total (see `Costs`): skipped."""
        if cost is None or moment < self._month:
            return
        day = self._day if self._day <= moment < self._day + DAY else day_start(moment)
        cells = self._cells
        for key, change in self._costs.observe((cell, day), status, prediction_id, cost):
            cells[key] = cells.get(key, 0.0) + change

    def document(self, now: float | None = None) -> dict[str, object]:
        now = time.time() if now is None else now
        self._forget_before(month_start(now))
        self._day = today = day_start(now)
        month = _Totals()
        day = _Totals()
        for (cell, when), usd in self._cells.items():
            month.add(cell, usd)
            if when == today:
                day.add(cell, usd)
        return {"today": day.document(today), "month": month.document(self._month)}

    def _forget_before(self, month: float) -> None:
        if month > self._month:
            self._month = month
            self._cells = {key: usd for key, usd in self._cells.items() if key[1] >= month}


class _Totals:
    def __init__(self) -> None:
        self.total = 0.0
        self.by: dict[str, dict[str | None, float]] = {d: {} for d in DIMENSIONS}

    def add(self, cell: Cell, usd: float) -> None:
        environment, user, model, client = cell
        self.total += usd
        for name, key in (("user", user), ("model", model), ("client", client), ("environment", environment)):
            table = self.by[name]
            table[key] = table.get(key, 0.0) + usd

    def document(self, since: float) -> dict[str, object]:
        by = {}
        for name, table in self.by.items():
            rows = sorted(((k, v) for k, v in table.items() if abs(v) > 1e-12), key=lambda kv: -kv[1])
            by[name] = [{"key": k, "usd": round(v, 6)} for k, v in rows[:TOP]]
        return {"since": _iso(since), "usd": round(self.total, 6), "by": by}


def _iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
