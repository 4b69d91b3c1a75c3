"""One Redis per process: every call bounded, every outage logged once.

Scripts, the request path's calls, go through `ScriptLane`: one pipelined connection
with one deadline timer. Everything else (the batched releases, the CLI's views) uses a
pool, each call under `timeout_ms`, both as the sockets' own timeouts and as an asyncio
deadline around the whole call (waiting for a pooled connection included). So no request
waits on Redis longer than that. redis-py's own retries are off: a retry would spend
the same budget twice.

A refused, reset or failing connection starts an outage at once: one log line, the
degraded flag up, and a probe that writes a short-lived key with backoff (a PING would
pass on a Redis that refuses writes), through the lane as the requests go. While the
outage lasts, calls fail at once without touching the network, so a dead Redis costs a
request nothing and the pool is not churned; the probe's success ends the outage with
one more line. The backoff is capped so that a returning Redis is used again within
about a second.

A call that runs out of time fails alone: on_error applies to it, as to every call that
waits past `timeout_ms`. The outage begins only when no call has been answered for
`SLOW_OUTAGE_TIMEOUTS` timeouts after it. A quiet replica may make no call meanwhile, so
one timeout before that the connection asks Redis itself, and that call's own deadline
ends the grace. A stall shorter than that (a Redis fork, a VM held up for a moment)
costs the calls that waited through it, not the ones after it; that it happened is
logged, at most once a minute. From the late call until the lane answers again the
connection shows as degraded, and the batched calls wait (see `Batch.flush`).

The URL is a `RedisURL`: logs, errors and the status show its host and database only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from skyproxy.cluster import resp
from skyproxy.cluster.errors import ClusterUnavailable
from skyproxy.cluster.lane import ScriptLane
from skyproxy.cluster.scripts import PROBE
from skyproxy.cluster.url import RedisURL

__all__ = ["OnError", "RedisConnection", "ScriptArg", "key_part"]

log = logging.getLogger("skyproxy.cluster")

T = TypeVar("T")
OnError = Literal["closed", "open"]
ScriptArg = bytes | str | int | float

# What "Redis is unavailable" looks like: refused, reset, timed out, loading, read-only,
# out of memory, wrong password. TimeoutError is an OSError.
_FAILURES = (RedisError, OSError, asyncio.TimeoutError)
MAX_CONNECTIONS = 128
PROBE_FIRST_S = 0.05
PROBE_MAX_S = 1.0
SLOW_OUTAGE_TIMEOUTS = 2  # timeouts without an answer after a late call: then an outage
LATE_LOG_EVERY_S = 60.0  # stalls that ended without an outage: a line at most this often
_REASON_CHARS = 160


if sys.version_info >= (3, 11):

    async def _bounded(call: Awaitable[T], seconds: float) -> T:
        async with asyncio.timeout(seconds):
            return await call

else:  # pragma: no cover

    async def _bounded(call: Awaitable[T], seconds: float) -> T:
        return await asyncio.wait_for(call, seconds)


def key_part(text: str) -> str:
    """A key component that cannot be mistaken for a separator, and that encodes: a header's
    bytes that are not UTF-8 come as lone surrogates, written as the text %uDCxx (then
    escaped as every "%" is, so that reading a key back and naming it again finds it)."""
    if not text.isascii():
        text = _SURROGATE.sub(_escaped, text)
    if ":" in text or "%" in text:
        return text.replace("%", "%25").replace(":", "%3A")
    return text


_SURROGATE = re.compile("[\ud800-\udfff]")


def _escaped(found: re.Match[str]) -> str:
    return f"%u{ord(found.group()):04X}"


class RedisConnection:
    """The process's Redis: a bounded pool, the outage state, and the error counter."""

    def __init__(
        self,
        url: RedisURL,
        *,
        on_error: OnError,
        timeout_ms: float,
        prefix: str,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.url = url
        self.on_error: OnError = on_error
        self.prefix = prefix
        self.timeout = timeout_ms / 1000
        self.errors_total = 0  # skyproxy_cluster_errors_total: every call that failed
        self.outages_total = 0
        self._down_since: float | None = None
        self._failed_in_outage = 0
        self._probe: asyncio.Task[None] | None = None
        self._late_since: float | None = None  # the first late call with no answer since
        self._late_calls = 0
        self._late_logged = -LATE_LOG_EVERY_S
        self._judge: asyncio.TimerHandle | None = None
        self._asking: asyncio.Task[None] | None = None  # the judge's own call to Redis
        self._closed = False  # calls failed by close() say nothing about Redis
        self._pool = BlockingConnectionPool.from_url(
            url.reveal(),
            max_connections=max_connections,
            timeout=self.timeout,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = Redis(connection_pool=self._pool)
        self._lane = ScriptLane(url.reveal(), self.timeout)
        self._probe_script = self._redis.register_script(PROBE)

    def __repr__(self) -> str:
        state = "degraded" if self.degraded else "ok"
        return f"RedisConnection({self.url.shown}, on_error={self.on_error}, {state})"

    @property
    def degraded(self) -> bool:
        """True from a failed call (refused, broken, or past timeout_ms) until Redis answers
        on the request path's connection again: "slower than timeout_ms" is degraded too."""
        return self._down_since is not None or self._late_since is not None

    @property
    def down(self) -> bool:
        """In an outage: calls fail at once, without being sent."""
        return self._down_since is not None

    @property
    def fails_open(self) -> bool:
        return self.on_error == "open"

    def key(self, *parts: str) -> str:
        """A namespaced key: the prefix, then the parts joined by ':' (escaped inside parts)."""
        return self.prefix + ":".join(key_part(p) for p in parts)

    def script(self, source: str) -> AsyncScript:
        """A Lua script run by its SHA, loaded again by redis-py after a Redis restart."""
        return self._redis.register_script(source)

    async def start(self) -> None:
        """Checks Redis once. An unreachable Redis starts an outage instead of failing."""
        with contextlib.suppress(ClusterUnavailable):
            await self.run(self._probe_script, [self.key("probe")], [])

    async def close(self) -> None:
        self._closed = True
        if self._judge is not None:
            self._judge.cancel()
            self._judge = None
        for task in (self._asking, self._probe):
            while task is not None and not task.done():  # see inflight.stop_task: one cancel may be swallowed
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
        self._asking = self._probe = None
        await self._lane.close()
        await self._redis.aclose()
        await self._pool.disconnect()

    async def call(self, operation: Callable[[Redis], Awaitable[T]]) -> T:
        """`operation(redis)` within the timeout, or `ClusterUnavailable`; counts failures."""
        if self._down_since is not None:
            self.errors_total += 1
            self._failed_in_outage += 1
            raise ClusterUnavailable(self.url.shown, "waiting for Redis to return")
        try:
            return await _bounded(operation(self._redis), self.timeout)
        except _FAILURES as exc:
            raise self._failed(exc) from None
        # An answer here does not end a stall: only one on the lane shows that the calls
        # left late on it have been run (see Batch.flush).

    async def run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        """A script on the pipelined connection: bounded, counted, `ClusterUnavailable` on failure."""
        return await self.run_tail(script, resp.tail(keys, args))

    async def run_tail(self, script: AsyncScript, call: resp.Tail) -> Any:
        """`run` with the keys and arguments already encoded."""
        if self._down_since is not None:
            self.errors_total += 1
            self._failed_in_outage += 1
            raise ClusterUnavailable(self.url.shown, "waiting for Redis to return")
        try:
            result = await self._lane.run_tail(script.sha, script.script, call)
        except _FAILURES as exc:
            raise self._failed(exc) from None
        if self._late_since is not None:
            self._answered()
        return result

    def status(self) -> dict[str, Any]:
        """For /-/status: where Redis is (host and database), and whether it answers."""
        since = self._down_since if self._down_since is not None else self._late_since
        down_for = None if since is None else round(time.monotonic() - since, 1)
        return {
            "redis": self.url.shown,
            "on_error": self.on_error,
            "degraded": self.degraded,
            "down_for_s": down_for,
            "errors_total": self.errors_total,
            "outages_total": self.outages_total,
        }

    # -- outages --------------------------------------------------------------------
    def _failed(self, exc: BaseException) -> ClusterUnavailable:
        self.errors_total += 1
        # The sockets' timeout and the deadline around the call are the same: either may fire.
        if isinstance(exc, TimeoutError | asyncio.TimeoutError | RedisTimeout):
            reason = f"no answer within {self.timeout * 1000:g} ms"
            if self._down_since is None:
                self._late(reason)
            else:
                self._failed_in_outage += 1
        else:
            reason = self._reason(exc)
            self._begin_outage(reason)
        return ClusterUnavailable(self.url.shown, reason)

    def _late(self, reason: str) -> None:
        """A call ran out of time: an outage if no call is answered within the grace."""
        if self._closed:
            return
        self._late_calls += 1
        if self._late_since is None:
            self._late_since = time.monotonic()
            grace = (SLOW_OUTAGE_TIMEOUTS - 1) * self.timeout  # then the question's own timeout
            self._judge = asyncio.get_running_loop().call_later(grace, self._unanswered, reason)

    def _unanswered(self, reason: str) -> None:
        self._judge = None
        if self._late_since is None or self._down_since is not None or self._closed:
            return
        if self._asking is not None:
            self._asking.cancel()  # a question about an earlier stall
        self._asking = asyncio.get_running_loop().create_task(self._ask(reason, self._late_since))

    async def _ask(self, reason: str, since: float) -> None:
        """No call answered since the late one, maybe because none was made: asks Redis."""
        try:
            await self._lane.run(self._probe_script.sha, PROBE, [self.key("probe")], [])
        except _FAILURES as exc:
            if self._late_since == since and self._down_since is None:
                timed_out = isinstance(exc, TimeoutError | asyncio.TimeoutError | RedisTimeout)
                self._begin_outage(reason if timed_out else self._reason(exc), 0)
            return
        if self._late_since == since:
            self._answered()

    def _answered(self) -> None:
        """A call was answered after late ones: the stall is over without an outage."""
        calls, self._late_since, self._late_calls = self._late_calls, None, 0
        if self._judge is not None:
            self._judge.cancel()
            self._judge = None
        now = time.monotonic()
        if now - self._late_logged >= LATE_LOG_EVERY_S:
            self._late_logged = now
            log.warning(
                "cluster: Redis %s answered again after %d %s got no answer within %g ms "
                "(on_error=%s applied to them); not an outage",
                self.url.shown,
                calls,
                "call" if calls == 1 else "calls",
                self.timeout * 1000,
                self.on_error,
            )

    def _reason(self, exc: BaseException) -> str:
        text = self.url.scrub(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        return text[:_REASON_CHARS]

    def _begin_outage(self, reason: str, failed: int = 1) -> None:
        if self._closed:
            return
        if self._down_since is not None:
            self._failed_in_outage += failed
            return
        failed += self._late_calls  # late calls just before it: one outage, from the first
        began = self._late_since if self._late_since is not None else time.monotonic()
        self._late_since, self._late_calls = None, 0
        if self._judge is not None:
            self._judge.cancel()
            self._judge = None
        self._down_since = began
        self._failed_in_outage = failed
        self.outages_total += 1
        consequence = (
            "serving without shared limits" if self.fails_open else "refusing limited requests with 503"
        )
        log.error(
            "cluster: Redis %s is unavailable (%s); on_error=%s: %s until it returns",
            self.url.shown,
            reason,
            self.on_error,
            consequence,
        )
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_back())

    def _end_outage(self) -> None:
        assert self._down_since is not None
        lasted = time.monotonic() - self._down_since
        log.warning(
            "cluster: Redis %s is back after %.1f s; %d calls failed meanwhile",
            self.url.shown,
            lasted,
            self._failed_in_outage,
        )
        self._down_since = None
        self._probe = None

    async def _probe_until_back(self) -> None:
        # Idle connections were opened to the Redis that failed; the probe and the calls
        # after it start on fresh ones.
        with contextlib.suppress(*_FAILURES):
            await self._pool.disconnect(inuse_connections=False)
        delay = PROBE_FIRST_S
        while True:
            await asyncio.sleep(delay)
            try:
                await self._lane.run(self._probe_script.sha, PROBE, [self.key("probe")], [])
            except _FAILURES:
                delay = min(delay * 2, PROBE_MAX_S)
                continue
            self._end_outage()
            return
