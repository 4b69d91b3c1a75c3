"""Whole-exchange deadlines: one heap and one sweeper task for every exchange in flight.

One periodic task rather than a timer per request keeps the hot path cheap; the price
is that a deadline may be late by up to `RESOLUTION`. An expired exchange's task is
cancelled while it is suspended inside the exchange, and the exchange, seeing its
deadline `fired`, turns that cancellation into a 504.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

RESOLUTION = 0.05  # seconds a deadline may be late
COMPACT_MIN = 4096


class Deadline:
    __slots__ = ("done", "fired", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.done = False
        self.fired = False

    def finish(self) -> None:
        self.done = True

    def absorb(self) -> None:
        """Called where the deadline's CancelledError was caught: it was ours, not a shutdown's."""
        uncancel = getattr(self.task, "uncancel", None)  # Python 3.11+ counts cancellations
        if uncancel is not None:
            uncancel()


class Deadlines:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._sweeper: asyncio.Task[None] | None = None
        self._compact_at = COMPACT_MIN

    def arm(self, seconds: float) -> Deadline:
        """A deadline `seconds` from now for the current task."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        deadline = Deadline(task)
        heapq.heappush(self._heap, (loop.time() + seconds, next(self._order), deadline))
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = loop.create_task(self._sweep())
        return deadline

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        heap = self._heap
        while heap:
            await asyncio.sleep(RESOLUTION)
            now = loop.time()
            while heap and (heap[0][2].done or heap[0][0] <= now):
                _, _, deadline = heapq.heappop(heap)
                if not deadline.done:
                    deadline.fired = True
                    deadline.task.cancel()
            if len(heap) > self._compact_at:
                # Finished exchanges behind a long one (a stream) would otherwise wait
                # for it to reach the front; drop them, amortised over the growth.
                heap[:] = [entry for entry in heap if not entry[2].done]
                heapq.heapify(heap)
                self._compact_at = max(COMPACT_MIN, 2 * len(heap))

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
