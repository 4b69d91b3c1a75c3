"""The relay: delivers the outbox to the apps, signed per Standard Webhooks, with retries.

Deliveries run off the request path, each in a task of its own, at most `per_origin` at
once to one origin and `max_in_flight` in all, so a slow or dead app never holds up
another one or the proxy. The store is the only queue: a delivery's outcome is written
after its attempt, so a crash mid-attempt leaves it pending, and it is sent again, with
the same webhook-id, after the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from skyproxy import __version__
from skyproxy.config import TargetPattern
from skyproxy.webhooks import schedule, targets
from skyproxy.webhooks.queue import DeliveryQueue, StoreQueue
from skyproxy.webhooks.signing import SigningKeys, signature_header
from skyproxy.webhooks.stats import WebhookStats
from skyproxy.webhooks.store import Due, Outbox, StoreThread

log = logging.getLogger("skyproxy")
ATTEMPT_TIMEOUT = 15.0  # seconds for one whole attempt: connect, send, answer head


@dataclass(frozen=True, slots=True)
class RelayConfig:
    allowed_targets: tuple[TargetPattern, ...]
    retry_schedule: tuple[float, ...]
    signing: SigningKeys


class Relay:
    def __init__(
        self,
        db: StoreThread,
        config: RelayConfig,
        stats: WebhookStats,
        *,
        per_origin: int = 4,
        max_in_flight: int = 64,
        poll_interval: float = 1.0,
        timeout: float = ATTEMPT_TIMEOUT,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        queue: DeliveryQueue | None = None,  # with [cluster]: the shared outbox
    ) -> None:
        self._queue = queue or StoreQueue(db)
        self.config = config
        self.stats = stats
        self._per_origin = per_origin
        self._max_in_flight = max_in_flight
        self._poll = poll_interval  # how soon a replay written by another process is seen
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._jitter = jitter
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._per: dict[str, int] = {}
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def wake(self) -> None:
        """Looks at the outbox now: a new event or a freed slot may have work for it."""
        self._wakeup.set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._max_in_flight),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=self._timeout,
        )
        self._loop_task = asyncio.create_task(self._run(), name="skyproxy-webhook-relay")

    async def stop(self, timeout: float) -> None:
        """Stops taking work, lets attempts in flight finish within `timeout`, then cancels."""
        self._stopping = True
        self._wakeup.set()
        if self._loop_task is not None:
            await asyncio.gather(self._loop_task, return_exceptions=True)
        tasks = list(self._in_flight.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=max(timeout, 0.01))
            for task in late:
                task.cancel()  # left pending in the store: sent again after the restart
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # -- the loop -------------------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            wait = self._poll
            try:
                wait = await self._dispatch()
            except (sqlite3.Error, OSError) as exc:
                log.error("webhook relay: cannot read the outbox: %s", exc)
            if wait > 0:
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait)

    async def _dispatch(self) -> float:
        """Starts the deliveries due now; returns how long to sleep unless woken."""
        room = self._max_in_flight - len(self._in_flight)
        full = tuple(origin for origin, count in self._per.items() if count >= self._per_origin)
        now = self._clock()
        outbox: Outbox = await self._queue.due(now, tuple(self._in_flight), full, room)
        self.stats.outbox_depth = outbox.depth
        self.stats.oldest_queued_at = outbox.oldest_queued_at
        skipped = False
        for due in outbox.due:
            if self._stopping:
                break
            if (
                self._per.get(due.origin, 0) >= self._per_origin
                or len(self._in_flight) >= self._max_in_flight
            ):
                skipped = True
                continue
            self._launch(due)
        if len(self._in_flight) >= self._max_in_flight:
            return self._poll  # a finishing attempt wakes the loop
        if skipped or (outbox.next_at is not None and outbox.next_at <= now):
            return 0.0
        if outbox.next_at is None:
            return self._poll
        return min(self._poll, outbox.next_at - now)

    def _launch(self, due: Due) -> None:
        self._per[due.origin] = self._per.get(due.origin, 0) + 1
        task = asyncio.create_task(self._deliver(due))
        self._in_flight[due.event_id] = task

        def done(_: asyncio.Task[None]) -> None:
            self._in_flight.pop(due.event_id, None)
            left = self._per[due.origin] - 1
            if left:
                self._per[due.origin] = left
            else:
                del self._per[due.origin]
            self._wakeup.set()

        task.add_done_callback(done)

    # -- one attempt ----------------------------------------------------------------------------
    async def _deliver(self, due: Due) -> None:
        config = self.config
        attempts = due.attempts + 1
        if not targets.allowed(due.target, config.allowed_targets):
            # Checked again here: the config may have changed since the create was let through.
            await self._queue.dead(due.event_id, due.attempts, "target not in allowed_targets")
            self.stats.dead += 1
            log.warning("webhook %s: target no longer allowed by allowed_targets; dead", due.event_id)
            return
        status, retry_after, error = await self._post(due, config)
        decision = schedule.decide(
            attempts, status, retry_after, config.retry_schedule, self._clock(), self._jitter
        )
        await self._record(due, attempts, decision, schedule.describe(status, error))

    async def _post(self, due: Due, config: RelayConfig) -> tuple[int | None, str | None, str | None]:
        assert self._session is not None
        timestamp = int(self._clock())
        headers = {
            "Content-Type": due.content_type,
            "User-Agent": f"skyproxy/{__version__}",
            "webhook-id": due.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(
                due.event_id, timestamp, due.body, config.signing.active(timestamp)
            ),
        }
        try:
            async with self._session.post(
                due.target, data=due.body, headers=headers, allow_redirects=False
            ) as answer:
                return answer.status, answer.headers.get("Retry-After"), None
        except (TimeoutError, asyncio.TimeoutError):
            return None, None, f"no answer within {self._timeout.total:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return None, None, f"connection failed: {type(exc).__name__}"

    async def _record(self, due: Due, attempts: int, decision: schedule.Decision, error: str) -> None:
        event_id = due.event_id
        if decision.verdict == "delivered":
            await self._queue.delivered(event_id, attempts)
            self.stats.delivered += 1
        elif decision.verdict == "gone":
            count = await self._queue.gone(due.route_id, event_id, attempts, "HTTP 410", self._clock())
            self.stats.gone += count
            log.warning(
                "webhook route %s…: its target answered 410 Gone; nothing more is sent", due.route_id[:6]
            )
        elif decision.verdict == "dead":
            await self._queue.dead(event_id, attempts, error)
            self.stats.dead += 1
            log.warning(
                "webhook %s to %s: dead after %d attempts (%s)", event_id, due.origin, attempts, error
            )
        else:
            next_at = self._clock() + decision.delay
            await self._queue.retry(event_id, attempts, next_at, error)
            self.stats.retried += 1
            log.info("webhook %s to %s: %s; retry in %.1f s", event_id, due.origin, error, decision.delay)
