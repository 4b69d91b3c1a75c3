"""The budgets' side of [cluster]: a reservation held on Redis, and how Redis keys name things."""

from __future__ import annotations

from skyproxy.budgets.hold import Hold, Subject
from skyproxy.budgets.periods import iso
from skyproxy.cluster.backend import BudgetBackend, Reservation


class SharedHold(Hold):
    """A reservation on the cluster's Redis; `release()` queues its release, once."""

    __slots__ = ("_backend", "_reservation")

    def __init__(self, backend: BudgetBackend, reservation: Reservation) -> None:
        super().__init__(None, 0)
        self._backend = backend
        self._reservation: Reservation | None = reservation

    def release(self) -> None:
        reservation, self._reservation = self._reservation, None
        if reservation is not None:
            self._backend.settle_soon(reservation, 0.0)


def period_label(period: str, start: float) -> str:
    """A window as Redis keys name it: its kind and first day, such as "week-2026-11-30"."""
    return f"{period}-{iso(start)[:10]}"


def subject_key(subject: Subject) -> str:
    """A subject as Redis keys name it; a prefix, so no user name reads as "no user"."""
    return "none" if subject is None else "=" + subject


def subject_from_key(key: str) -> Subject:
    return None if key == "none" else key[1:]
