"""The relay: delivers the outbox to the apps, signed per Standard Webhooks, with retries.

Deliveries run off the request path, each in a task of its own, at most `per_origin` at
once to one origin and `max_in_flight` in all, so a slow or dead app never holds up
another one or the proxy. The store is the only queue: a delivery's outcome is written
after its attempt, so a crash mid-attempt leaves it pending, and it is sent again, with
the same webhook-id, after the restart.

Attempts go out through skyproxy's own HTTP/1.1 client: no redirects followed, a bound
on the whole attempt, and of the app's answer only the status and `Retry-After` matter.
A short answer of announced length is read so its connection can carry the next
delivery; any other is left unread and its connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from skyproxy import __version__
from skyproxy.config import TargetPattern
from skyproxy.http1 import Client, Limits, Origin, Response, Timeouts, UpstreamError
from skyproxy.webhooks import schedule, targets
from skyproxy.webhooks.queue import DeliveryQueue, StoreQueue
from skyproxy.webhooks.signing import SigningKeys, signature_header
from skyproxy.webhooks.stats import WebhookStats
from skyproxy.webhooks.store import Due, Outbox, StoreThread

log = logging.getLogger("skyproxy")
ATTEMPT_TIMEOUT = 15.0  # seconds for one whole attempt: connect, send, answer head
ANSWER_READ = 65_536  # an app's answer up to this long (and announced) is read, to keep its connection
_KEPT_TARGETS = 1024  # parsed target URLs remembered
# Characters left as they are in a target's path and query: reserved ones and `%`, so
# an escape the app wrote stays one; anything else (spaces cannot pass allowed_targets,
# non-ASCII can) is percent-encoded.
_SAFE = "!#$%&'()*+,/:;=?@[]~"


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
        self._timeout = timeout
        self._clock = clock
        self._jitter = jitter
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._per: dict[str, int] = {}
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._client: Client | None = None
        self._targets: dict[str, tuple[Origin, str]] = {}

    def wake(self) -> None:
        """Looks at the outbox now: a new event or a freed slot may have work for it."""
        self._wakeup.set()

    async def start(self) -> None:
        timeout = self._timeout
        self._client = Client(
            Timeouts(connect=timeout, read=timeout, write=timeout, pool=timeout),
            # The dispatch sends at most per_origin at once to an origin; the pool agrees.
            Limits(max_connections=self._per_origin, max_idle=self._per_origin),
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
        if self._client is not None:
            await self._client.close()

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
        """One attempt: the app's status and Retry-After, or what went wrong."""
        assert self._client is not None
        try:
            origin, target = self._where(due.target)
        except ValueError:
            return None, None, "connection failed: not an http(s) URL"
        timestamp = int(self._clock())
        signature = signature_header(due.event_id, timestamp, due.body, config.signing.active(timestamp))
        head = b"Content-Type: %s\r\nUser-Agent: skyproxy/%s\r\n" % (
            _content_type(due.content_type),
            __version__.encode(),
        )
        head += b"webhook-id: %s\r\nwebhook-timestamp: %d\r\nwebhook-signature: %s\r\n" % (
            due.event_id.encode(),
            timestamp,
            signature.encode(),
        )
        deadline = asyncio.get_running_loop().time() + self._timeout
        try:
            async with _deadline(deadline):
                answer = await self._client.request("POST", origin, target, head, due.body)
        except (TimeoutError, asyncio.TimeoutError):
            return None, None, f"no answer within {self._timeout:g} s"
        except (UpstreamError, OSError) as exc:
            return None, None, f"connection failed: {type(exc).__name__}"
        async with answer:
            retry_after = _retry_after(answer)
            await _read_short(answer, deadline)
        return answer.status, retry_after, None

    def _where(self, url: str) -> tuple[Origin, str]:
        """The target's origin and request target (path and query), parsed once per URL."""
        found = self._targets.get(url)
        if found is None:
            parts = urlsplit(url)
            target = quote(parts.path or "/", safe=_SAFE)
            if parts.query:
                target += "?" + quote(parts.query, safe=_SAFE)
            if len(self._targets) >= _KEPT_TARGETS:
                self._targets.clear()
            found = self._targets[url] = (Origin.parse(url), target)
        return found

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


def _content_type(value: str) -> bytes:
    # As received from Skytells; a value that could break the header line is replaced.
    return value.encode() if value.isascii() and value.isprintable() else b"application/json"


def _retry_after(answer: Response) -> str | None:
    for name, value in answer.headers:
        if name.lower() == b"retry-after":
            return value.decode("latin-1")
    return None


async def _read_short(answer: Response, deadline: float) -> None:
    """Reads a short answer of announced length, so its connection can be kept; the status
    is known already, so a body that never comes only costs the connection."""
    length = answer.content_length
    if length is None or length > ANSWER_READ:
        return
    with contextlib.suppress(UpstreamError, OSError, TimeoutError, asyncio.TimeoutError):
        async with _deadline(deadline):
            await answer.read()


@contextlib.asynccontextmanager
async def _deadline(when: float) -> AsyncIterator[None]:
    """`asyncio.timeout_at` for Python 3.10 too: the task is cancelled at `when` (loop time),
    and that cancellation, only that one, comes out of the block as TimeoutError."""
    task = asyncio.current_task()
    assert task is not None
    fired = False

    def fire() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    handle = asyncio.get_running_loop().call_at(when, fire)
    try:
        yield
    except asyncio.CancelledError:
        if not fired:
            raise  # a stop's, not ours
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+ counts cancellations
        if uncancel is not None:
            uncancel()
        raise TimeoutError from None
    finally:
        handle.cancel()
