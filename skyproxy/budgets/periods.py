"""Calendar periods in UTC: a day from midnight, an ISO week from Monday, a month from the 1st."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Literal

Period = Literal["day", "week", "month"]
PERIODS: tuple[Period, ...] = ("day", "week", "month")


def window(period: Period, moment: float) -> tuple[float, float]:
    """The (start, end) in epoch seconds of the period holding `moment`; end is exclusive."""
    at = datetime.fromtimestamp(moment, timezone.utc)
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = day, day + timedelta(days=1)
    elif period == "week":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    return start.timestamp(), end.timestamp()


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
