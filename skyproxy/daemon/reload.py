"""Reload: watch the config file, then load, validate and resolve a whole new generation.

Nothing here touches the serving state: `prepare()` either returns a complete new
(settings, keys) pair or raises, and the server swaps it in or keeps the old one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from skyproxy import config
from skyproxy.errors import ConfigError
from skyproxy.keys.secret import Secret
from skyproxy.proxy.runtime import Runtime, resolve_keys

log = logging.getLogger("skyproxy")


class ReloadFailed(Exception):
    """The new config is invalid or a key cannot be resolved; the old one keeps serving."""


async def prepare(path: Path, previous: Runtime) -> tuple[config.Settings, dict[str, Secret]]:
    try:
        settings = await asyncio.to_thread(config.load, path)
    except ConfigError as exc:
        raise ReloadFailed(str(exc)) from None
    keys, errors = await asyncio.to_thread(resolve_keys, settings, previous)
    if errors:
        raise ReloadFailed("; ".join(str(e) for e in errors.values()))
    return settings, keys


def digest(path: Path) -> str | None:
    """The sha256 of the file's bytes, or None while it cannot be read (mid-rename)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


async def watch_config(
    path: Path,
    on_change: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
    loaded: Callable[[], str | None],
) -> None:
    """Calls `on_change` whenever the file's content differs from the one last loaded.

    `loaded()` is the digest of the content the server last loaded (or tried to), so
    a change made before the watcher was ready, or already applied by SIGHUP, is
    judged against what is serving, not against what the watcher saw first. The
    folder is watched, not the file, so that editors that save by writing a new file
    and renaming it over the old one are still seen; a quiet tick every second
    re-checks the digest, so no change is lost between two events.
    """
    from watchfiles import awatch

    path = path.resolve()

    def is_ours(_change: object, changed: str) -> bool:
        return Path(changed).name == path.name

    async for _changes in awatch(
        path.parent,
        watch_filter=is_ours,
        stop_event=stop,
        debounce=400,
        step=50,
        rust_timeout=1000,
        yield_on_timeout=True,
        recursive=False,
    ):
        current = digest(path)
        if current is None or current == loaded():
            continue  # mid-rename, touched without a change, or already loaded
        log.info("config file changed: reloading")
        await on_change()
