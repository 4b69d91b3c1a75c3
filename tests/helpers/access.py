"""Helpers for the token, budget and in-flight tests: logs at DEBUG, secrets scans, a recording upstream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from helpers import CANARY, assert_no_canary


@contextlib.contextmanager
def all_logs() -> Iterator[list[logging.LogRecord]]:
    """Every log record at DEBUG, skyproxy's included even where its logger does not propagate."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    loggers = [logging.getLogger(), logging.getLogger("skyproxy")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def log_text(records: list[logging.LogRecord]) -> str:
    return "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text}" for r in records)


def assert_secrets_absent(secrets: list[str], *captured: object) -> None:
    """Neither the canary key nor any token, nor their tails, in anything captured."""
    assert_no_canary(*captured)
    for item in captured:
        text = item if isinstance(item, str) else repr(item)
        for secret in secrets:
            assert secret not in text, "a token leaked"
            assert secret[-16:] not in text, "part of a token leaked"


def files_text(*paths: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in paths if p.exists())


@dataclass
class Recorder:
    """An upstream that keeps every request head it got and answers a create like Skytells."""

    heads: list[dict[str, str]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    hold: asyncio.Event | None = None  # when set: creates wait for it before answering
    creates: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.heads.append(dict(request.headers))
        self.bodies.append(await request.read())
        if request.method == "POST":
            self.creates += 1
            pid = f"pred_{self.creates:04d}"
            if self.hold is not None:
                await self.hold.wait()
            return web.json_response({"id": pid, "status": "starting", "model": "truefusion-pro"}, status=201)
        return web.json_response({"object": "list", "data": []})


SKY_KEY = CANARY
