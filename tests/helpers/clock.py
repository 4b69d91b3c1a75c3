"""A fake `loop.time`, the clock the rate limits (and aiolimiter, their reference) read."""

from __future__ import annotations

import asyncio

import pytest


class FakeClock:
    """Stands in for `loop.time`: frozen until advanced."""

    def __init__(self) -> None:
        # A round start keeps sums of .5 steps exact.
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def freeze_loop_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Replaces the running loop's `time` with a `FakeClock` for the rest of the test."""
    fake = FakeClock()
    monkeypatch.setattr(asyncio.get_running_loop(), "time", fake)
    return fake
