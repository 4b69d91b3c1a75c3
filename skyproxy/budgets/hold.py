"""A create's reservation under this process's budgets, given back once the exchange ends."""

from __future__ import annotations

Subject = str | None


class Hold:
    """Reserved nano-dollars under one budget for one subject; `release()` gives them back, once."""

    __slots__ = ("_amount", "_reserved", "_subject")

    def __init__(self, reserved: dict[Subject, int] | None, subject: Subject, amount: int) -> None:
        self._reserved = reserved if amount else None
        self._subject = subject
        self._amount = amount

    def release(self) -> None:
        reserved = self._reserved
        if reserved is None:
            return
        self._reserved = None
        subject = self._subject
        left = reserved[subject] - self._amount
        if left:
            reserved[subject] = left
        else:
            del reserved[subject]


class Holds(Hold):
    """Reservations under several budgets at once, released together."""

    __slots__ = ("_holds",)

    def __init__(self, holds: list[Hold]) -> None:
        super().__init__(None, None, 0)
        self._holds = holds

    def release(self) -> None:
        holds, self._holds = self._holds, []
        for hold in holds:
            hold.release()


NO_HOLD = Hold(None, None, 0)
