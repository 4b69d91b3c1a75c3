"""Shared `max_in_flight` caps: leases in a sorted set, renewed while the request runs.

A lease expires `lease_s` after it was last renewed. This replica renews every lease it
holds three times per lease, so a long request keeps its slot, and a slot held by a
replica that died is free again within `lease_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence

from skyproxy.cluster.backend import InFlightDecision, Lease, Slot
from skyproxy.cluster.batch import Batch
from skyproxy.cluster.connection import RedisConnection, ScriptArg
from skyproxy.cluster.errors import ClusterUnavailable
from skyproxy.cluster.scripts import INFLIGHT_ACQUIRE, INFLIGHT_RELEASE, INFLIGHT_RENEW

__all__ = ["DEFAULT_LEASE_S", "RedisInFlight"]

DEFAULT_LEASE_S = 10.0
_RENEW_BATCH = 500  # leases per renewal call, so one call stays short


class RedisInFlight:
    """`InFlightBackend` on Redis."""

    def __init__(self, connection: RedisConnection, *, lease_s: float = DEFAULT_LEASE_S) -> None:
        self._connection = connection
        self.lease_s = lease_s
        self._lease_ms = max(1, round(lease_s * 1000))
        self._held: dict[str, Lease] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._acquire = connection.script(INFLIGHT_ACQUIRE)
        self._release = connection.script(INFLIGHT_RELEASE)
        self._renew = connection.script(INFLIGHT_RENEW)
        self._later = Batch(connection)

    def key(self, slot: Slot) -> str:
        return self._connection.key("inflight", slot.environment, slot.rule, "user", slot.user)

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def queued(self) -> Batch:
        """Releases not yet sent."""
        return self._later

    async def acquire(self, slots: Sequence[Slot]) -> InFlightDecision:
        if not slots:
            return InFlightDecision(True, None, None, 0)
        lease_id = os.urandom(12).hex()
        keys = tuple(self.key(s) for s in slots)
        args: list[ScriptArg] = [lease_id, self._lease_ms, *(s.cap for s in slots)]
        tried = not self._connection.down
        try:
            raw = await self._connection.run(self._acquire, keys, args)
        except ClusterUnavailable:
            if tried:  # a timeout, say: the script may have run, and the slots be held
                self._later.put(self._release, keys, [lease_id])
            if self._connection.fails_open:
                return InFlightDecision(True, None, None, 0, unchecked=True)
            raise
        except asyncio.CancelledError:  # the client left: the answer may never be read
            self._later.put(self._release, keys, [lease_id])
            raise
        if raw[0] != 1:
            return InFlightDecision(False, None, int(raw[1]) - 1, int(raw[2]))
        lease = Lease(lease_id, keys)
        self._held[lease_id] = lease
        return InFlightDecision(True, lease, None, 0)

    async def release(self, lease: Lease | None) -> None:
        if lease is None:
            return
        self._held.pop(lease.id, None)
        with contextlib.suppress(ClusterUnavailable):
            await self._connection.run(self._release, lease.keys, [lease.id])

    def release_soon(self, lease: Lease) -> None:
        """`release` for a caller that cannot await: queued and sent in order with others."""
        self._held.pop(lease.id, None)
        self._later.put(self._release, lease.keys, [lease.id])

    async def renew_all(self) -> int:
        """Extends every lease this replica holds; returns how many were extended."""
        pairs = [(key, lease.id) for lease in list(self._held.values()) for key in lease.keys]
        renewed = 0
        for start in range(0, len(pairs), _RENEW_BATCH):
            batch = pairs[start : start + _RENEW_BATCH]
            keys = [key for key, _ in batch]
            args: list[ScriptArg] = [self._lease_ms, *(lease_id for _, lease_id in batch)]
            renewed += int(await self._connection.run(self._renew, keys, args))
        return renewed

    def start(self) -> None:
        self._later.start()
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def stop(self) -> None:
        task, self._renewer = self._renewer, None
        if task is not None:
            await stop_task(task)
        await self._later.stop()

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            # An outage is already logged and counted by the connection.
            with contextlib.suppress(ClusterUnavailable):
                await self.renew_all()


async def stop_task(task: asyncio.Task[None]) -> None:
    """Cancels `task` until it ends: Python 3.11's wait_for can swallow one cancellation
    when the call it wraps completes at the same moment, and one cancel would then hang."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
