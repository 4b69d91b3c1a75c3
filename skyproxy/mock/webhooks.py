"""The mock's webhooks: a signed POST when a prediction starts and when it completes.

Each POST carries `X-Skytells-Signature`, the hex HMAC-SHA256 of the body keyed by the
API key that made the create, as Skytells signs in its default mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger("skyproxy")


class _Sender:
    def __init__(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        self.tasks: set[asyncio.Task[None]] = set()


_SENDER = web.AppKey("mock_webhook_sender", _Sender)
ATTEMPTS = 3  # Skytells "may retry"; the mock tries a few times on a failed connection


def url_of(body: dict[str, Any]) -> str | None:
    webhook = body.get("webhook")
    if isinstance(webhook, dict):
        webhook = webhook.get("url")
    return webhook if isinstance(webhook, str) and webhook else None


async def sender(app: web.Application) -> AsyncIterator[None]:
    """The app's HTTP session for webhooks, and its deliveries cancelled at cleanup."""
    sending = app[_SENDER] = _Sender()
    yield
    for task in list(sending.tasks):
        task.cancel()
    await asyncio.gather(*sending.tasks, return_exceptions=True)
    await sending.session.close()


def deliver(
    app: web.Application,
    url: str,
    key: str,
    snapshot: Callable[[], dict[str, Any]],
    finish: Callable[[], Awaitable[None]],
) -> None:
    sending = app[_SENDER]

    async def run() -> None:
        await asyncio.sleep(0)  # after the create's answer has been handed over
        await _post(sending.session, url, key, snapshot())
        await finish()
        await _post(sending.session, url, key, snapshot())

    task = asyncio.create_task(run())
    sending.tasks.add(task)
    task.add_done_callback(sending.tasks.discard)


async def _post(session: aiohttp.ClientSession, url: str, key: str, prediction: dict[str, Any]) -> None:
    body = json.dumps(prediction, separators=(",", ":")).encode()
    signature = hmac.new(key.encode(), body, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/json", "X-Skytells-Signature": signature}
    for attempt in range(ATTEMPTS):
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
            async with session.post(url, data=body, headers=headers) as answer:
                if answer.status < 500:
                    return
        await asyncio.sleep(0.2 * (attempt + 1))
    log.warning("mock: a webhook to %s was not accepted after %d attempts", url.split("/hooks/")[0], ATTEMPTS)
