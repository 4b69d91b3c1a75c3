"""One PING to the configured Redis, for `skyproxy check`: bounded, and never showing the URL."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from skyproxy.cluster.errors import ClusterUnavailable
from skyproxy.cluster.url import RedisURL

__all__ = ["ping"]

_REASON_CHARS = 160


async def ping(url: RedisURL, timeout_ms: float) -> float:
    """Seconds one PING took, connect included; `ClusterUnavailable` past `timeout_ms` or on error."""
    timeout = timeout_ms / 1000
    client = Redis.from_url(
        url.reveal(),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    started = time.monotonic()
    try:
        # One deadline over connect, AUTH and PING together: the sockets' own are per step.
        await asyncio.wait_for(client.ping(), timeout)
    except (RedisError, OSError, asyncio.TimeoutError) as exc:
        raise ClusterUnavailable(url.shown, _reason(url, exc, timeout_ms)) from None
    finally:
        await client.aclose()
    return time.monotonic() - started


def _reason(url: RedisURL, exc: BaseException, timeout_ms: float) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError) or "Timeout" in type(exc).__name__:
        return f"no answer within {timeout_ms:g} ms"
    text = url.scrub(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    return text[:_REASON_CHARS]
