"""The spend rule, shared by `audit summary` and the budgets: each prediction counted once.

A line without a prediction id counts its own cost. A prediction counts the cost on its
terminal line (succeeded, failed, canceled) once there is one, else the estimate on its
"created" line. `Costs` applies that rule one line at a time: `observe()` returns the
changes the line makes (an estimate replaced is taken back, the final cost added), and
`totals()` gives the sums, adding in the same order as a whole-file pass would.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from skyproxy.audit.record import TERMINAL

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Costs(Generic[K]):
    """Spend per key (a group, or where a line counts), line by line.

    With `limit`, only that many predictions are remembered; a terminal line whose
    create was forgotten then adds its cost without taking the estimate back. With
    `totals=False`, only `observe()`'s changes are wanted: the costs of lines without a
    prediction id are not kept, so a long-running caller's memory does not grow with
    every refused or failed create.
    """

    __slots__ = ("_estimates", "_finals", "_keep_loose", "_limit", "_loose")

    def __init__(self, limit: int | None = None, totals: bool = True) -> None:
        self._limit = limit
        self._keep_loose = totals
        self._loose: dict[K, float] = {}
        # Ordered, so that forgetting the oldest is O(1) (a plain dict's front fills with holes).
        self._estimates: OrderedDict[str, tuple[K, float | None]] = OrderedDict()
        self._finals: OrderedDict[str, tuple[K, float]] = OrderedDict()

    def observe(
        self, key: K, status: str, prediction_id: str | None, cost: float | None
    ) -> list[tuple[K, float]]:
        """Takes one line in; returns the (key, change) pairs it makes, possibly none."""
        if prediction_id is None:
            if self._keep_loose:
                self._loose[key] = self._loose.get(key, 0.0) + (cost or 0.0)
            return [] if not cost else [(key, cost)]
        if status == "created":  # the line every create writes: kept short
            estimates = self._estimates
            old = estimates.get(prediction_id)
            estimates[prediction_id] = (key, cost)
            if self._limit is not None and len(estimates) > self._limit:
                estimates.popitem(last=False)
            if prediction_id in self._finals:
                return []
            if old is None or old[1] is None:
                return [] if cost is None else [(key, cost)]
            return [(old[0], -old[1])] if cost is None else [(old[0], -old[1]), (key, cost)]
        changes: list[tuple[K, float]] = []
        final = self._finals.get(prediction_id)
        if status in TERMINAL and cost is not None:
            replaced = final if final is not None else self._estimates.get(prediction_id)
            self._remember(self._finals, prediction_id, (key, cost))
            if replaced is not None and replaced[1] is not None:
                changes.append((replaced[0], -replaced[1]))
            changes.append((key, cost))
        return changes

    def first_estimate(self, key: K, prediction_id: str, cost: float) -> bool:
        """A "created" line that is its prediction's first line, taken in: its one change is
        then +cost at key. False, with nothing taken, when `observe()` must decide."""
        estimates = self._estimates
        if prediction_id in estimates or prediction_id in self._finals:
            return False
        estimates[prediction_id] = (key, cost)
        if self._limit is not None and len(estimates) > self._limit:
            estimates.popitem(last=False)
        return True

    def __len__(self) -> int:
        """How many entries are held: lines without a prediction id, estimates and final costs."""
        return len(self._loose) + len(self._estimates) + len(self._finals)

    def totals(self) -> dict[K, float]:
        """The spend per key: own costs, then final costs, then unreplaced estimates."""
        if not self._keep_loose:
            raise ValueError("totals() of a Costs made with totals=False")
        result = dict(self._loose)
        for key, cost in self._finals.values():
            result[key] = result.get(key, 0.0) + cost
        for pid, (key, estimate) in self._estimates.items():
            if pid not in self._finals and estimate is not None:
                result[key] = result.get(key, 0.0) + estimate
        return result

    def _remember(self, table: OrderedDict[str, V], pid: str, value: V) -> None:
        table[pid] = value
        if self._limit is not None and len(table) > self._limit:
            table.popitem(last=False)
