"""Spend today and this month (UTC), by user, model, client token and environment.

Each prediction is counted once, by the audit trail's spend rule (`Costs`): the cost on
its terminal line, else the estimate on its "created" line. The totals move by the
changes each line makes, so reading them costs nothing per line already seen.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass, field

from skyproxy.audit.costs import Costs

DIMENSIONS = ("user", "model", "client", "environment")
REMEMBERED = 100_000  # predictions per period whose estimate a later line may replace
TOP = 20  # rows per dimension in a document

Cell = tuple[str, str | None, str | None, str | None]  # environment, user, model, client


def day_start(moment: float) -> float:
    t = time.gmtime(moment)
    return float(calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)))


def month_start(moment: float) -> float:
    t = time.gmtime(moment)
    return float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))


@dataclass
class _Period:
    start: float
    costs: Costs[Cell] = field(default_factory=lambda: Costs(limit=REMEMBERED))
    total: float = 0.0
    by: dict[str, dict[str | None, float]] = field(default_factory=lambda: {d: {} for d in DIMENSIONS})

    def add(self, cell: Cell, status: str, prediction_id: str | None, cost: float | None) -> None:
        for (environment, user, model, client), change in self.costs.observe(
            cell, status, prediction_id, cost
        ):
            self.total += change
            for name, key in zip(DIMENSIONS, (user, model, client, environment), strict=True):
                table = self.by[name]
                table[key] = table.get(key, 0.0) + change

    def document(self) -> dict[str, object]:
        by = {}
        for name, table in self.by.items():
            rows = sorted(((k, v) for k, v in table.items() if abs(v) > 1e-12), key=lambda kv: -kv[1])
            by[name] = [{"key": k, "usd": round(v, 6)} for k, v in rows[:TOP]]
        return {"since": _iso(self.start), "usd": round(self.total, 6), "by": by}


class Spend:
    def __init__(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.day = _Period(day_start(now))
        self.month = _Period(month_start(now))

    def observe(
        self,
        moment: float,
        cell: Cell,
        status: str,
        prediction_id: str | None,
        cost: float | None,
    ) -> None:
        self.advance(moment)
        for period in (self.day, self.month):
            if moment >= period.start:
                period.add(cell, status, prediction_id, cost)

    def advance(self, now: float) -> None:
        """Starts a new day or month once the clock has passed into it."""
        if day_start(now) > self.day.start:
            self.day = _Period(day_start(now))
        if month_start(now) > self.month.start:
            self.month = _Period(month_start(now))

    def document(self, now: float | None = None) -> dict[str, object]:
        self.advance(time.time() if now is None else now)
        return {"today": self.day.document(), "month": self.month.document()}


def _iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
