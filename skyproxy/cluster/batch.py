"""Script calls that end an exchange, queued without waiting and sent in order.

Releasing an in-flight lease or settling a budget reservation happens in the handler's
`finally`, which cannot await. The call is queued here instead, and one task sends
everything queued as a single MULTI/EXEC pipeline, in the order it was queued. So a
create's spend (queued when its audit line is written) and the release of its
reservation (queued just after, in the same step on the event loop) reach Redis
together: no other replica ever sees the reservation gone before the spend is in.

A batch that cannot be sent is counted by the connection and dropped: leases and
reservations then run out on their own.
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
        self._queue.append((script, keys, args))
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
        while self._queue:
            await self.flush()

    async def flush(self) -> None:
        """Sends the oldest `MAX_BATCH` calls queued as one transaction."""
        batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        if not batch:
            return
        try:
            failed = await self._connection.call(lambda redis: _send(redis, batch))
        except ClusterUnavailable:  # logged once per outage and counted by the connection
            self.lost += len(batch)
            return
        except Exception:  # a bug must not end the task: every later release would be lost
            self.lost += len(batch)
            log.exception("cluster: %d queued Redis script calls could not be sent", len(batch))
            return
        if failed:
            self.lost += failed
            log.error("cluster: %d of %d queued Redis script calls failed", failed, len(batch))

    async def _send_forever(self) -> None:
        assert self._wake is not None
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self.flush()


async def _send(redis: Redis, batch: list[_Queued]) -> int:
    """Runs the batch in one MULTI/EXEC; returns how many of its calls failed."""
    pipe = redis.pipeline(transaction=True)
    async with pipe:
        for script, keys, args in batch:
            # Queues the call; the pipeline loads any script Redis lost before EXEC.
            await script(keys, args, client=pipe)
        results = await pipe.execute(raise_on_error=False)
    return sum(1 for result in results if isinstance(result, Exception))
