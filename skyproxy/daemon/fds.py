"""File descriptors: the soft limit raised at start, the client cap derived from it, a low-fd alarm."""

from __future__ import annotations

import asyncio
import logging
import os
import resource

log = logging.getLogger("skyproxy")
RESERVE = 64  # descriptors kept for the audit file, the mocks, the loop, reloads
CHECK_EVERY = 10.0
WARN_AT = 0.8  # of the soft limit in use
CLEAR_AT = 0.7


def raise_soft_limit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard one, as nginx's worker_rlimit_nofile does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
            return soft
        return hard
    return soft


def soft_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_cap(configured: int, listeners: int) -> int:
    """Client connections per listener that the descriptors can carry.

    A proxied request holds two descriptors, the client's and the upstream's, so the
    room is halved and shared among the listeners.
    """
    limit = soft_limit()
    if limit == resource.RLIM_INFINITY:
        return configured
    room = max(limit - RESERVE, 2) // 2 // max(listeners, 1)
    return max(1, min(configured, room))


def open_count() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None  # not Linux: the alarm is off, the cap still holds


async def watch(interval: float = CHECK_EVERY) -> None:
    """Logs once when descriptors run low, and once when they recover."""
    low = False
    while True:
        used, limit = open_count(), soft_limit()
        if used is not None and limit != resource.RLIM_INFINITY:
            if not low and used >= WARN_AT * limit:
                low = True
                log.warning("file descriptors running low: %d of %d in use", used, limit)
            elif low and used < CLEAR_AT * limit:
                low = False
                log.info("file descriptors back to %d of %d", used, limit)
        await asyncio.sleep(interval)
