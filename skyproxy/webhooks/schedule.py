"""What an attempt's answer means, and when the next attempt runs: pure, so tests need no clock."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Literal

JITTER = 0.2  # each scheduled delay is drawn from [0.9, 1.1] of itself, so retries spread out

Verdict = Literal["delivered", "retry", "dead", "gone"]


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    delay: float = 0.0  # seconds until the next attempt, for "retry"


def decide(
    attempts: int,
    status: int | None,
    retry_after: str | None,
    schedule: Sequence[float],
    now: float,
    random: Callable[[], float],
) -> Decision:
    """`attempts` counts the one just made; `status` is None for a timeout or a failed connection."""
    if status is not None and 200 <= status < 300:
        return Decision("delivered")
    if status == 410:
        return Decision("gone")
    if attempts > len(schedule):
        return Decision("dead")
    slot = schedule[attempts - 1]
    if status in (429, 503):
        asked = retry_after_seconds(retry_after, now)
        if asked is not None:
            # Honoured, but never past the next scheduled slot: a huge Retry-After cannot
            # park a delivery for longer than the schedule allows.
            return Decision("retry", min(asked, slot))
    return Decision("retry", slot * (1 - JITTER / 2 + JITTER * random()))


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date; None when unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    seconds = (when - datetime.fromtimestamp(now, timezone.utc)).total_seconds()
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def describe(status: int | None, error: str | None) -> str:
    """The `lastError` text of a failed attempt."""
    if status is None:
        return error or "no answer"
    return f"HTTP {status}"
