"""Helpers for tests that drive a daemon: its status, and polling until something happens."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from helpers import Daemon

CREATE = {"model": "truefusion-pro", "input": {"prompt": "a lighthouse"}}
Spawn = Callable[..., Daemon]


def audit_lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def create(
    session: aiohttp.ClientSession, base: str, user: str = "alice"
) -> tuple[int, dict[str, object]]:
    async with session.post(f"{base}/v1/predictions", json=CREATE, headers={"X-User-Id": user}) as r:
        body = await r.json(content_type=None)
        return r.status, body


async def status_of(session: aiohttp.ClientSession, daemon: Daemon) -> dict[str, object]:
    async with session.get(f"{daemon.url}/-/status") as r:
        assert r.status == 200
        result: dict[str, object] = await r.json()
        return result


def generation(status: dict[str, object]) -> int:
    return int(status["config"]["generation"])  # type: ignore[index]


async def eventually(check: Callable[[], object], what: str, deadline_s: float = 15.0) -> None:
    """Polls `check` (sync or async) until it returns true; fails after the deadline."""
    deadline = time.monotonic() + deadline_s
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {deadline_s}s: {what} (last: {last!r})")
