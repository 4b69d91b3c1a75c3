"""Exchange deadlines that move: one heap and one sweeper task for every exchange in flight.

An exchange's deadline is moved on as it makes progress: to `upstream_timeout` from the
moment it waits for the answer's head, then to `idle_timeout` from each piece of a body
that moves. Moving it later is one store (`at`): the sweeper finds the new time when the
old one comes round and files the deadline again; moving it earlier files it at once.
One periodic task rather than a timer per request keeps the hot path cheap; the price
is that a deadline may be late by up to `RESOLUTION`. An expired exchange's task is
cancelled while it is suspended inside the exchange, and the exchange, seeing its
deadline `fired`, turns that cancellation into its own answer, or cuts the client off
when the answer had started.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from enum import Enum

RESOLUTION = 0.05  # seconds a deadline may be late
COMPACT_MIN = 4096


class Phase(Enum):
    """What the exchange waits for, which says whose silence a fired deadline was."""

    UPLOAD = "upload"  # the client's body, arriving
    SEND = "send"  # the client's body, taken by the upstream
    HEAD = "head"  # the upstream's answer head
    BODY = "body"  # the answer's body, from the upstream and on to the client


class Deadline:
    __slots__ = ("at", "clock", "done", "entry", "fired", "owner", "phase", "task")

    def __init__(
        self, owner: Deadlines, task: asyncio.Task[object], clock: Callable[[], float], phase: Phase
    ) -> None:
        self.owner = owner
        self.task = task
        self.clock = clock
        self.phase = phase
        self.at = 0.0
        self.entry = 0  # the heap entry the sweeper honours; older ones are dropped
        self.done = False
        self.fired = False

    def extend(self, seconds: float) -> None:
        """Progress: the exchange may now run until `seconds` from now. Never earlier than
        before, as long as `seconds` stays the same within a phase."""
        self.at = self.clock() + seconds

    def enter(self, phase: Phase, seconds: float) -> None:
        """The exchange waits for something else now, for up to `seconds` from now."""
        self.phase = phase
        at = self.clock() + seconds
        earlier = at < self.at
        self.at = at
        if earlier:
            self.owner.file(self)

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

    def arm(self, seconds: float, phase: Phase = Phase.HEAD) -> Deadline:
        """A deadline `seconds` from now for the current task."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        clock = loop.time
        deadline = Deadline(self, task, clock, phase)
        deadline.at = clock() + seconds
        self.file(deadline)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = loop.create_task(self._sweep())
        return deadline

    def file(self, deadline: Deadline) -> None:
        entry = deadline.entry = next(self._order)
        heapq.heappush(self._heap, (deadline.at, entry, deadline))

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        heap = self._heap
        while heap:
            await asyncio.sleep(RESOLUTION)
            now = loop.time()
            while heap and (heap[0][2].done or heap[0][0] <= now):
                _, entry, deadline = heapq.heappop(heap)
                if deadline.done or deadline.fired or entry != deadline.entry:
                    continue
                if deadline.at > now:  # moved on since it was filed
                    self.file(deadline)
                    continue
                deadline.fired = True
                deadline.task.cancel()
            if len(heap) > self._compact_at:
                # Finished exchanges behind a long one (a stream) would otherwise wait
                # for it to reach the front; drop them, amortised over the growth.
                heap[:] = [entry for entry in heap if not entry[2].done and entry[1] == entry[2].entry]
                heapq.heapify(heap)
                self._compact_at = max(COMPACT_MIN, 2 * len(heap))

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
