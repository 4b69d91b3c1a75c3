"""Exchange deadlines that move: one heap and one sweeper task for every exchange in flight.

An exchange's deadline is moved on as it makes progress: to `upstream_timeout` from the
moment it waits for the answer's head, then to `idle_timeout` from each piece of a body
that moves. Moving it later is one store (`at`): the sweeper finds the new time when the
old one comes round and files the deadline again. An exchange files its deadline once,
at the earliest any of its phases could end (`shortest`), so moving it earlier than
filed, which files it anew, is the exception.
One periodic task rather than a timer per request keeps the hot path cheap; the price
is that a deadline may be late by up to `RESOLUTION`. An expired exchange's task is
cancelled while it is suspended inside the exchange, and the exchange, seeing its
deadline `fired`, turns that cancellation into its own answer, or cuts the client off
when the answer had started.

A loop held up past a deadline runs its due timers and queued callbacks before it reads
its sockets again, so the sweep can find a deadline expired while the bytes that move
it on sit unread. An expired deadline therefore fires only if it has still not moved
after `LOOKS` more turns of the loop: bytes already received reach their exchange
within those turns. A silent peer is cut at most `RESOLUTION` plus those turns late.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from enum import Enum

RESOLUTION = 0.05  # seconds a deadline may be late, beyond the `LOOKS` turns
LOOKS = 3  # turns of the loop before an expired deadline fires: read, then wake the exchange, then it runs
COMPACT_MIN = 4096


class Phase(Enum):
    """What the exchange waits for, which says whose silence a fired deadline was."""

    UPLOAD = "upload"  # the client's body, arriving
    SEND = "send"  # the client's body, taken by the upstream
    HEAD = "head"  # the upstream's answer head
    BODY = "body"  # the answer's body, from the upstream and on to the client


class Deadline:
    __slots__ = ("at", "clock", "done", "entry", "filed", "fired", "owner", "phase", "task")

    def __init__(
        self, owner: Deadlines, task: asyncio.Task[object], clock: Callable[[], float], phase: Phase
    ) -> None:
        self.owner = owner
        self.task = task
        self.clock = clock
        self.phase = phase
        self.at = 0.0
        self.filed = 0.0  # when the sweeper looks at it next
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
        at = self.at = self.clock() + seconds
        if at < self.filed:
            self.owner.file(self, at)

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

    def arm(self, seconds: float, phase: Phase = Phase.HEAD, shortest: float | None = None) -> Deadline:
        """A deadline `seconds` from now for the current task, filed to be looked at
        `shortest` from now: the shortest time any phase it will enter may be given."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        clock = loop.time
        deadline = Deadline(self, task, clock, phase)
        now = clock()
        deadline.at = now + seconds
        self.file(deadline, now + (seconds if shortest is None else min(shortest, seconds)))
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = loop.create_task(self._sweep())
        return deadline

    def file(self, deadline: Deadline, at: float) -> None:
        deadline.filed = at
        entry = deadline.entry = next(self._order)
        heapq.heappush(self._heap, (at, entry, deadline))

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        heap = self._heap
        while heap:
            await asyncio.sleep(RESOLUTION)
            now = loop.time()
            expired = self._expired(now)
            if expired:
                for _ in range(LOOKS):  # bytes already received get their turns first
                    await asyncio.sleep(0)
                self._fire(expired, now)
            if len(heap) > self._compact_at:
                # Finished exchanges behind a long one (a stream) would otherwise wait
                # for it to reach the front; drop them, amortised over the growth.
                heap[:] = [entry for entry in heap if not entry[2].done and entry[1] == entry[2].entry]
                heapq.heapify(heap)
                self._compact_at = max(COMPACT_MIN, 2 * len(heap))

    def _expired(self, now: float) -> list[tuple[int, Deadline]]:
        """Takes out the deadlines that are due at `now`; files again those moved on since."""
        heap = self._heap
        expired: list[tuple[int, Deadline]] = []
        while heap and (heap[0][2].done or heap[0][0] <= now):
            _, entry, deadline = heapq.heappop(heap)
            if deadline.done or deadline.fired or entry != deadline.entry:
                continue
            if deadline.at > now:  # moved on since it was filed
                self.file(deadline, deadline.at)
                continue
            expired.append((entry, deadline))
        return expired

    def _fire(self, expired: list[tuple[int, Deadline]], found: float) -> None:
        """Cancels the exchanges whose deadlines, expired when `found`, have not moved since."""
        for entry, deadline in expired:
            if deadline.done or deadline.fired:
                continue
            if deadline.at > found:  # progress during the looks
                if entry == deadline.entry:  # else entering a phase has filed it anew
                    self.file(deadline, deadline.at)
                continue
            deadline.fired = True
            deadline.task.cancel()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
