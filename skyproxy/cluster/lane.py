"""The request path's Redis: one connection that carries every script call, pipelined.

`Redis.execute_command` checks a pooled connection out and back in, runs the call
through a retry object and observability hooks, and arms a timeout for the write and
another for the read; concurrent calls each pay a write and a read of their own. On the
request path that cost more than the script. Here every script call goes out on one
redis-py `Connection`, through its public `send_packed_command` and `read_response`,
encoded by `resp`:
- a call made while none is waiting for a reply is written at once by its caller;
  calls made while others wait leave together in one write, on the next turn of the
  event loop, and one reader task hands the replies back in order, so 64 concurrent
  requests share a round trip;
- one timer serves every call's deadline (see `_Session._expire`). A call that runs out
  of time fails alone, as does a caller that gives up: its reply is still read and
  dropped, so the connection stays in step;
- scripts run by SHA; a Redis that lost them (a restart) gets the source once by EVAL,
  which caches it again.

A connection that breaks fails every call waiting on it; the next call opens another,
within its own deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Connection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from skyproxy.cluster import resp

__all__ = ["ScriptLane"]

ScriptSource = str | bytes | memoryview
ScriptArg = resp.Arg
_Waiter = tuple["asyncio.Future[Any]", float]
# uvloop's timers have millisecond resolution: a timer may fire just before its time.
_EARLY_S = 0.001
_LOOKS = 3  # turns of the loop a late reply gets to be read: enough for uvloop's order
_STALE_S = 1.0  # beyond a call's deadline: a connection owing a reply this long is dropped


class _Session:
    """One connected `Connection`, its reader and writer tasks, and the calls awaiting replies."""

    def __init__(
        self,
        connection: Connection,
        loop: asyncio.AbstractEventLoop,
        on_broken: Callable[[_Session], None],
    ) -> None:
        self.connection = connection
        self.loop = loop
        self._on_broken = on_broken
        self.waiting: deque[_Waiter] = deque()
        self.outgoing: list[bytes] = []
        self.broken: BaseException | None = None
        self._wake: asyncio.Future[None] = loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._looking = False
        self._tasks = (
            loop.create_task(self._read_forever()),
            loop.create_task(self._write_forever()),
        )

    async def call(self, command: bytes, deadline: float) -> Any:
        """Sends one encoded command and waits for its reply (or its failure)."""
        reply: asyncio.Future[Any] = self.loop.create_future()
        idle = not self.waiting
        self.waiting.append((reply, deadline))
        self._watch(deadline)
        if not idle:
            self.outgoing.append(command)
            if not self._wake.done():
                self._wake.set_result(None)
        else:
            # Nothing in flight: writing now saves waking the writer for one call.
            # `send_packed_command` writes before its first await, so `waiting` and
            # the bytes on the wire stay in the same order.
            try:
                await self._send(command)
            except Exception as exc:
                self.fail(exc)
            except BaseException:  # cancelled while the write waited: the reply is dropped
                reply.cancel()
                raise
        return await reply

    def _watch(self, deadline: float) -> None:
        timer = self._timer
        if not self._looking and (timer is None or deadline < timer.when()):
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._expire)

    def fail(self, error: BaseException) -> None:
        """Every waiting call gets `error`; the session takes no more calls."""
        first = self.broken is None
        if first:
            self.broken = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self.waiting = self.waiting, deque()
        for reply, _ in waiting:
            if not reply.done():
                reply.set_exception(error)
        if first:
            self._on_broken(self)

    async def close(self) -> None:
        self.fail(RedisConnectionError("the Redis connection was closed"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.connection.disconnect(nowait=True)

    # -- deadlines ------------------------------------------------------------------
    # A timer can run before the reader has had its turn with replies already received:
    # on a busy loop a reply read at the deadline is still queued behind other callbacks.
    # So a call is failed only after `_LOOKS` more turns of the loop without its reply.
    def _expire(self) -> None:
        self._timer = None
        self._looking = True
        self._look(_LOOKS)

    def _look(self, left: int) -> None:
        if self.broken is not None:
            return
        now = self.loop.time() + _EARLY_S
        if left and any(deadline <= now and not reply.done() for reply, deadline in self.waiting):
            self.loop.call_soon(self._look, left - 1)
            return
        self._looking = False
        late = TimeoutError("no reply from Redis in time")
        for reply, deadline in self.waiting:
            if deadline <= now and not reply.done():
                reply.set_exception(late)
        # Replies still owed to calls that have failed keep the connection in step. One
        # owed for far longer than any call may wait means a connection that will not
        # answer (a vanished host sends no reset): open another.
        if self.waiting and self.waiting[0][1] + _STALE_S <= now:
            self.fail(TimeoutError("no reply from Redis on this connection"))
            return
        self._arm()

    def _arm(self) -> None:
        if not self.waiting:
            return
        when = self.waiting[0][1] + _STALE_S
        for reply, deadline in self.waiting:
            if not reply.done():
                when = min(when, deadline)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._expire)

    async def _send(self, chunks: bytes | list[bytes]) -> None:
        if not self.connection.is_connected:
            # send_packed_command would connect again, out of step with `waiting`.
            raise RedisConnectionError("the Redis connection was lost")
        await self.connection.send_packed_command(chunks, check_health=False)

    async def _write_forever(self) -> None:
        try:
            while True:
                await self._wake
                self._wake = self.loop.create_future()
                chunks, self.outgoing = self.outgoing, []
                if self.broken is not None:
                    return
                await self._send(chunks)
        except Exception as exc:
            self.fail(exc)

    async def _read_forever(self) -> None:
        try:
            while True:
                try:
                    answer: Any = await self.connection.read_response()
                except ResponseError as exc:  # an error reply: the connection is still in step
                    answer = exc
                if not self.waiting:
                    raise RedisConnectionError("Redis sent a reply nobody asked for")
                reply, _ = self.waiting.popleft()
                if reply.done():  # its caller gave up
                    continue
                if isinstance(answer, Exception):
                    reply.set_exception(answer)
                else:
                    reply.set_result(answer)
        except Exception as exc:
            self.fail(exc)


class ScriptLane:
    """Script calls on one pipelined connection, each bounded by `timeout` seconds."""

    def __init__(self, url: str, timeout: float) -> None:
        self.timeout = timeout
        # No socket timeout: the reader waits for replies indefinitely while idle, and
        # the session's timer is the one deadline. Connecting is bounded by `timeout`.
        self._pool = ConnectionPool.from_url(
            url,
            socket_timeout=None,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._session: _Session | None = None
        self._connecting: asyncio.Future[_Session] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def run(
        self, sha: str, source: ScriptSource, keys: Sequence[str], args: Sequence[ScriptArg]
    ) -> Any:
        """EVALSHA, or EVAL once when Redis does not know the script, within the timeout."""
        return await self.run_tail(sha, source, resp.tail(keys, args))

    async def run_tail(self, sha: str, source: ScriptSource, call: resp.Tail) -> Any:
        """`run` with the keys and arguments already encoded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        session = self._session
        if session is None or session.broken is not None:
            session = await self._connect(deadline)
        try:
            return await session.call(resp.evalsha(sha.encode(), call), deadline)
        except NoScriptError:
            pass
        if session.broken is not None:
            session = await self._connect(deadline)
        text = source.encode() if isinstance(source, str) else bytes(source)
        return await session.call(resp.eval_(text, call), deadline)

    def reset(self) -> None:
        """Drops the connection; the next call opens another."""
        session, self._session = self._session, None
        if session is not None:
            session.fail(RedisConnectionError("the Redis connection was dropped"))

    async def close(self) -> None:
        connecting = self._connecting
        if connecting is not None:
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
        self.reset()
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self._pool.disconnect()

    async def _connect(self, deadline: float) -> _Session:
        # Calls that arrive while a connection is being opened wait for that one.
        loop = asyncio.get_running_loop()
        if self._connecting is None:
            self.reset()
            self._connecting = loop.create_task(self._open())
            self._connecting.add_done_callback(self._opened)
        remaining = deadline - loop.time()
        return await asyncio.wait_for(asyncio.shield(self._connecting), max(remaining, 0.0))

    async def _open(self) -> _Session:
        connection = self._pool.make_connection()
        try:
            await asyncio.wait_for(connection.connect(), self.timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
            raise
        return _Session(connection, asyncio.get_running_loop(), self._broke)

    def _opened(self, connecting: asyncio.Future[_Session]) -> None:
        self._connecting = None
        if not connecting.cancelled() and connecting.exception() is None:
            self._session = connecting.result()

    def _broke(self, session: _Session) -> None:
        if self._session is session:
            self._session = None
        self._retire(session)

    def _retire(self, session: _Session) -> None:
        task = asyncio.get_running_loop().create_task(session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
