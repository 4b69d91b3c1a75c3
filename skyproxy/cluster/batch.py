"""Script calls that end an exchange, queued without waiting and sent in order.

Releasing an in-flight lease or settling a budget reservation happens in the handler's
`finally`, which cannot await. The call is queued here instead, and one task sends
what is queued as MULTI/EXEC pipelines, in the order it was queued. So a create's spend
(queued when its audit line is written) and the release of its reservation (queued just
after, in the same step on the event loop) reach Redis together: no other replica ever
sees the reservation gone before the spend is in.

While Redis is away the calls wait, in order, and go out once it answers again, so the
spend of creates served meanwhile is not lost. The queue is bounded: past `MAX_PENDING`
the oldest calls are dropped and counted, and their leases and reservations run out on
their own, as a dead replica's do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from skyproxy.cluster.connection import RedisConnection, ScriptArg
from skyproxy.cluster.errors import ClusterUnavailable

__all__ = ["Batch"]

log = logging.getLogger("skyproxy.cluster")

_Queued = tuple[AsyncScript, Sequence[str], Sequence[ScriptArg]]
# Calls per transaction, so one stays well inside timeout_ms under a burst. A split
# keeps the order: a spend sent in one transaction still lands before its release in the
# next, so no replica can see room that is not there.
MAX_BATCH = 256
MAX_PENDING = 100_000
RETRY_S = 0.25  # while Redis is away; its return is noticed by the connection's probe


class Batch:
    """An ordered queue of script calls and the one task that sends them."""

    def __init__(self, connection: RedisConnection) -> None:
        self._connection = connection
        self._queue: list[_Queued] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.lost = 0  # calls dropped: Redis unavailable, or the script failed

    @property
    def pending(self) -> int:
        return len(self._queue)

    def put(self, script: AsyncScript, keys: Sequence[str], args: Sequence[ScriptArg]) -> None:
        queue = self._queue
        queue.append((script, keys, args))
        if len(queue) > MAX_PENDING:
            del queue[0]
            self.lost += 1
        if self._wake is not None:
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._send_forever())

    async def stop(self) -> None:
        """Sends what is queued (each attempt bounded by timeout_ms), then ends the task."""
        task, self._task = self._task, None
        self._closing = True
        if task is not None:
            assert self._wake is not None
            self._wake.set()
            await asyncio.wait({task}, timeout=max(1.0, 4 * self._connection.timeout))
            while not task.done():  # see inflight.stop_task: one cancel may be swallowed
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
        while self._queue and await self.flush():
            pass
        self.lost += len(self._queue)  # Redis is away: their leases and reservations run out
        self._queue.clear()

    async def flush(self) -> bool:
        """Sends the oldest `MAX_BATCH` calls queued as one transaction; False, keeping
        them queued, while Redis is unavailable."""
        queue = self._queue
        batch = queue[:MAX_BATCH]
        if not batch:
            return True
        # Not even tried in an outage: it is counted once, not per retry. Nor after a call
        # on the request path's lane ran out of time, until the lane answers again: a
        # reserve left late there may still run, and the release that undoes it must not
        # reach Redis first on this other connection.
        if self._connection.degraded:
            return False
        try:
            failed = await self._connection.call(lambda redis: _send(redis, batch))
        except ClusterUnavailable:  # logged once per outage and counted by the connection
            return False
        except Exception:  # a bug must not end the task: every later release would be lost
            del queue[: len(batch)]
            self.lost += len(batch)
            log.exception("cluster: %d queued Redis script calls could not be sent", len(batch))
            return True
        # Calls queued meanwhile went to the end; the front is still this batch.
        del queue[: len(batch)]
        if failed:
            self.lost += failed
            log.error("cluster: %d of %d queued Redis script calls failed", failed, len(batch))
        return True

    async def _send_forever(self) -> None:
        assert self._wake is not None
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            while self._queue and not self._closing:
                if not await self.flush():
                    await asyncio.sleep(RETRY_S)


async def _send(redis: Redis, batch: list[_Queued]) -> int:
    """Runs the batch in one MULTI/EXEC; returns how many of its calls failed."""
    pipe = redis.pipeline(transaction=True)
    async with pipe:
        for script, keys, args in batch:
            # Queues the call; the pipeline loads any script Redis lost before EXEC.
            await script(keys, args, client=pipe)
        results = await pipe.execute(raise_on_error=False)
    return sum(1 for result in results if isinstance(result, Exception))
