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
from skyproxy.keys import Secret
from skyproxy.runtime import Runtime, resolve_keys

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


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


async def watch_config(path: Path, on_change: Callable[[], Awaitable[object]], stop: asyncio.Event) -> None:
    """Calls `on_change` whenever the file's content changes.

    The folder is watched, not the file, so that editors that save by writing a new
    file and renaming it over the old one are still seen.
    """
    from watchfiles import awatch

    path = path.resolve()
    last = _digest(path)

    def is_ours(_change: object, changed: str) -> bool:
        return Path(changed).name == path.name

    async for _changes in awatch(path.parent, watch_filter=is_ours, stop_event=stop, debounce=400, step=50):
        digest = _digest(path)
        if digest is None or digest == last:
            continue  # mid-rename, or touched without a change
        last = digest
        log.info("config file changed: reloading")
        await on_change()
