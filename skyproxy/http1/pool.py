"""One origin's connections: the idle ones, the busy ones, and the requests waiting for one.

At most `max_connections` are open (or opening) at once. A request that finds none idle
and no room waits in line; a connection released meanwhile goes straight to the first
in line, and a closed one leaves room the first in line may use to open a new one. The
most recently used idle connection is handed out first: it is the least likely to be
stale. At most `max_idle` are kept; beyond that the oldest is closed.
"""

from __future__ import annotations

import asyncio
import collections

from skyproxy.http1.connection import CLOSED, IDLE, Connection
from skyproxy.http1.errors import PoolTimeout, UpstreamError
from skyproxy.http1.origin import Origin
from skyproxy.http1.settings import Limits

# What a waiter is given: a released connection, or None for room to open one.
_Turn = asyncio.Future["Connection | None"]


class Pool:
    __slots__ = ("_waiters", "busy", "closed", "idle", "limits", "opening", "origin")

    def __init__(self, origin: Origin, limits: Limits) -> None:
        self.origin = origin
        self.limits = limits
        self.idle: dict[Connection, None] = {}  # insertion order: the last is the newest
        self.busy: set[Connection] = set()
        self.opening = 0  # room reserved for connections being opened
        self.closed = False
        self._waiters: collections.deque[_Turn] = collections.deque()

    def take(self, now: float) -> Connection | None:
        """An idle connection still fresh, or None. Nobody jumps the line."""
        if self._waiters:
            return None
        idle = self.idle
        stale_before = now - self.limits.keepalive
        while idle:
            conn, _ = idle.popitem()
            if conn.state is IDLE and conn.idle_since > stale_before:
                self.busy.add(conn)
                return conn
            conn.close()
        return None

    def reserve(self) -> bool:
        """Room to open one more connection, if the origin has it and nobody waits."""
        if self._waiters or len(self.idle) + len(self.busy) + self.opening >= self.limits.max_connections:
            return False
        self.opening += 1
        return True

    def opened(self, conn: Connection) -> None:
        """A reserved connection is open and busy."""
        self.opening -= 1
        self.busy.add(conn)

    def unreserve(self) -> None:
        """Opening a reserved connection failed: its room goes to the next in line."""
        self.opening -= 1
        self._give_room()

    async def wait(self, timeout: float) -> Connection | None:
        """Waits in line: a released connection, or None once room was reserved for us."""
        loop = asyncio.get_running_loop()
        turn: _Turn = loop.create_future()
        self._waiters.append(turn)
        timer = loop.call_later(timeout, _expire, turn, timeout)
        try:
            return await turn
        except BaseException:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._pass_on(turn.result())  # given just as we gave up
            raise
        finally:
            timer.cancel()
            if turn in self._waiters:
                self._waiters.remove(turn)

    def put(self, conn: Connection) -> None:
        """A released connection, reusable: to the first in line, else idle."""
        if self.closed:
            conn.close()
        if conn.state is CLOSED:
            return
        turn = self._next_turn() if self._waiters else None
        if turn is not None:
            turn.set_result(conn)  # it stays busy, in its new owner's hands
            return
        self.busy.discard(conn)
        conn.idle_since = asyncio.get_running_loop().time()
        idle = self.idle
        if len(idle) >= self.limits.max_idle:
            if not idle:
                conn.close()
                return
            next(iter(idle)).close()
        idle[conn] = None

    def discard(self, conn: Connection) -> None:
        """A connection closed: it leaves the pool, and its room goes to the next in line."""
        self.busy.discard(conn)
        self.idle.pop(conn, None)
        self._give_room()

    def expire(self, now: float) -> None:
        stale_before = now - self.limits.keepalive
        for conn in [c for c in self.idle if c.idle_since <= stale_before]:
            conn.close()

    def close(self) -> None:
        self.closed = True
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_exception(UpstreamError("the upstream client is closing"))
        for conn in [*self.idle, *self.busy]:
            conn.close()

    def _give_room(self) -> None:
        if len(self.idle) + len(self.busy) + self.opening >= self.limits.max_connections:
            return
        turn = self._next_turn()
        if turn is not None:
            self.opening += 1
            turn.set_result(None)

    def _pass_on(self, given: Connection | None) -> None:
        if given is None:
            self.unreserve()
        else:
            self.put(given)

    def _next_turn(self) -> _Turn | None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                return turn
        return None


def _expire(turn: _Turn, timeout: float) -> None:
    if not turn.done():
        turn.set_exception(PoolTimeout(f"no upstream connection free within {timeout:g} s"))
