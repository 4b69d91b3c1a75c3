"""Where a create's estimate is reserved under this process's budgets until the exchange ends.

A create reserves into one `Account` per budget that applies: its subject's spend and
reservations in the budget's current window. The `Hold` it gets back is shared by every
create that reserves the same amount in the same accounts, so taking a reservation
allocates nothing; whoever takes one releases it exactly once.
"""

from __future__ import annotations

Subject = str | None
HELD_AMOUNTS = 16  # distinct amounts an account keeps holds for: prices are few


class Account:
    """One subject's spend and reservations under one budget, in whole nano-dollars."""

    __slots__ = ("holds", "reserved", "spent")

    def __init__(self) -> None:
        self.spent = 0  # in the budget's current window
        self.reserved = 0  # by creates in flight, whatever the window
        self.holds: dict[int, Hold] | None = None  # by amount; made at the first reservation

    def hold(self, amount: int) -> Hold:
        """Reserves `amount`; the caller has checked it fits."""
        self.reserved += amount
        holds = self.holds
        if holds is None:
            holds = self.holds = {}
        found = holds.get(amount)
        if found is None:
            if len(holds) >= HELD_AMOUNTS:
                holds.clear()
            found = holds[amount] = Hold(self, amount)
        return found


EMPTY = Account()  # what an absent account reads as: nothing spent or held (never reserved in)


class Hold:
    """An amount reserved in one account; `release()` gives it back (call it once)."""

    __slots__ = ("_account", "_amount")

    def __init__(self, account: Account | None, amount: int) -> None:
        self._account = account
        self._amount = amount

    def release(self) -> None:
        account = self._account
        if account is not None:
            account.reserved -= self._amount


class Holds(Hold):
    """Reservations under several budgets at once, released together."""

    __slots__ = ("_holds",)

    def __init__(self, holds: list[Hold]) -> None:
        super().__init__(None, 0)
        self._holds = holds

    def release(self) -> None:
        for hold in self._holds:
            hold.release()


NO_HOLD = Hold(None, 0)
