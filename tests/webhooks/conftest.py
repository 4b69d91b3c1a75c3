"""Fixtures: a receiver and a relay on a real SQLite file, bound to an ephemeral port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import CANARY
from helpers.webhooks import Hooks

from skyproxy.config.settings import DEFAULT_ALLOWED_TARGETS
from skyproxy.keys.secret import Secret
from skyproxy.webhooks.receiver import Arrival, Receiver, ReceiverConfig
from skyproxy.webhooks.relay import Relay, RelayConfig
from skyproxy.webhooks.signing import SigningKeys, SigningSecret, new_secret
from skyproxy.webhooks.stats import WebhookStats
from skyproxy.webhooks.store import StoreThread


@pytest.fixture
async def servers() -> AsyncIterator[list[TestServer]]:
    started: list[TestServer] = []
    yield started
    for server in started:
        await server.close()


@pytest.fixture
async def hooks(tmp_path: Path) -> AsyncIterator[Hooks]:
    path = tmp_path / "state" / "webhooks.sqlite3"
    db = await StoreThread.open(path)
    stats = WebhookStats()
    secret = new_secret()
    relay = Relay(
        db,
        RelayConfig(DEFAULT_ALLOWED_TARGETS, (0.2, 0.2, 0.2), SigningKeys(SigningSecret(secret))),
        stats,
        per_origin=2,
        poll_interval=0.2,
        timeout=60.0,  # no test here waits for it: a loaded machine must not turn into retries
    )
    arrivals: list[Arrival] = []

    def stored(arrival: Arrival) -> None:
        arrivals.append(arrival)
        relay.wake()

    config = ReceiverConfig({"dev": (Secret(CANARY), Secret("sk-previous-key"))}, max_body_bytes=4096)
    receiver = Receiver(db, config, stats, stored)
    runner = web.ServerRunner(web.Server(receiver.handle), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    await relay.start()
    found = Hooks(f"http://{host}:{port}", path, db, receiver, relay, stats, secret, arrivals)
    try:
        yield found
    finally:
        await runner.cleanup()
        await relay.stop(timeout=1.0)
        await db.close()
