"""A create's reservation under this process's budgets, given back once the exchange ends."""

from __future__ import annotations

Subject = str | None


class Hold:
    """Reserved nano-dollars against some budgets; `release()` gives them back, once."""

    __slots__ = ("_amount", "_keys", "_reserved")

    def __init__(
        self, reserved: dict[tuple[str, Subject], int], keys: list[tuple[str, Subject]], amount: int
    ):
        self._reserved = reserved
        self._keys = keys if amount else []
        self._amount = amount

    def release(self) -> None:
        keys, self._keys = self._keys, []
        reserved = self._reserved
        for key in keys:
            left = reserved[key] - self._amount
            if left:
                reserved[key] = left
            else:
                del reserved[key]


NO_HOLD = Hold({}, [], 0)
