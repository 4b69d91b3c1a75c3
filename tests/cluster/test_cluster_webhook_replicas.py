"""Webhooks across three replicas: any receiver knows the route, each event is relayed once,
and a delivery whose replica was SIGKILLed mid-attempt is finished by another."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import CANARY, Daemon, free_port
from helpers.daemon import eventually
from helpers.redis_server import RedisServer
from standardwebhooks import Webhook

from skyproxy.webhooks.signing import new_secret, skytells_signature

Replicas = Callable[..., list[Daemon]]


@dataclass
class Skytells:
    """A stand-in upstream: answers creates and remembers the webhook URL each one carried."""

    url: str = ""
    hooks: list[str] = field(default_factory=list)


@dataclass
class App:
    """The app's webhook endpoint; `hold` keeps the first attempt hanging until it is set."""

    url: str = ""
    hits: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)
    hold: asyncio.Event | None = None


@pytest.fixture
async def skytells() -> AsyncIterator[Skytells]:
    found = Skytells()

    async def create(request: web.Request) -> web.Response:
        body = await request.json()
        found.hooks.append(body["webhook"]["url"])
        prediction = {"id": f"pred_{len(found.hooks)}", "status": "starting", "model": body["model"]}
        return web.json_response(prediction, status=201)

    app = web.Application()
    app.router.add_post("/v1/predictions", create)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    found.url = str(server.make_url("")).rstrip("/")
    yield found
    await server.close()


@pytest.fixture
async def app_target() -> AsyncIterator[App]:
    found = App()

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        found.hits.append((request.headers["webhook-id"], body, dict(request.headers)))
        if found.hold is not None and len(found.hits) == 1:
            await found.hold.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    found.url = str(server.make_url("/hook"))
    yield found
    if found.hold is not None:
        found.hold.set()
    await server.close()


def webhooks_table(secret: str, receivers: list[str]) -> Callable[[Path], str]:
    """A [webhooks] table per replica: its own receiver port, one shared signing secret."""

    def table(folder: Path) -> str:
        (folder / "whsec").write_text(secret + "\n")
        port = free_port()
        receivers.append(f"http://127.0.0.1:{port}")
        return (
            f'[webhooks]\nlisten = ["127.0.0.1:{port}"]\npublic_url = "http://127.0.0.1:{port}"\n'
            'signing_secret = "file:whsec"\nstore = "state/webhooks.sqlite3"\nretry_schedule = [0.2, 0.2]\n'
        )

    return table


async def create(session: aiohttp.ClientSession, replica: Daemon, target: str) -> None:
    body = {"model": "truefusion-pro", "input": {}, "webhook": {"url": target, "events": ["completed"]}}
    async with session.post(
        f"{replica.url}/v1/predictions", json=body, headers={"X-User-Id": "alice"}
    ) as answer:
        assert answer.status == 201, await answer.text()


async def callback(
    session: aiohttp.ClientSession, receiver: str, hook_url: str, event: dict[str, Any]
) -> Any:
    """Skytells' callback, signed with the environment's key, sent to one replica's receiver."""
    path = hook_url.split("/hooks/", 1)[1]
    body = json.dumps(event, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Skytells-Signature": skytells_signature(CANARY.encode(), body),
    }
    async with session.post(f"{receiver}/hooks/{path}", data=body, headers=headers) as answer:
        return answer.status, await answer.json()


async def test_any_replica_receives_and_each_event_is_relayed_once(
    redis_server: RedisServer, start_replicas: Replicas, skytells: Skytells, app_target: App
) -> None:
    secret = new_secret()
    receivers: list[str] = []
    replicas = start_replicas(
        redis_server.url, upstream=skytells.url, extra=webhooks_table(secret, receivers)
    )
    async with aiohttp.ClientSession() as session:
        for i in range(3):
            await create(session, replicas[i], app_target.url)
        events = [
            {"id": f"pred_{n}", "status": status, "output": [f"{n}-{status}"]}
            for n in range(1, 4)
            for status in ("processing", "succeeded")
        ]
        # Every event reaches every receiver at once: none of them made that event's route
        # but one, and all but one arrival is a duplicate.
        answers = await asyncio.gather(
            *(
                callback(session, receiver, skytells.hooks[int(event["id"][-1]) - 1], event)
                for event in events
                for receiver in receivers
            )
        )
        assert {status for status, _ in answers} == {200}
        duplicates = sum(1 for _, body in answers if body.get("duplicate"))
        assert duplicates == len(events) * 2
        await eventually(lambda: len(app_target.hits) >= len(events), "every event relayed")
        await asyncio.sleep(1.5)  # longer than a relay's poll: nothing more arrives
        ids = [webhook_id for webhook_id, _, _ in app_target.hits]
        assert len(ids) == len(set(ids)) == len(events)
        received = sorted(json.loads(body)["output"][0] for _, body, _ in app_target.hits)
        assert received == sorted(e["output"][0] for e in events)
        for _, body, headers in app_target.hits:
            Webhook(secret).verify(body, headers)  # signed for the app, never with the key
            assert CANARY.encode() not in body
        for replica in replicas:
            async with session.get(f"{replica.url}/-/status") as r:
                assert (await r.json())["webhooks"]["outbox_depth"] == 0
        # An unknown route is unknown on every replica.
        status, body = await callback(session, receivers[0], "http://x/hooks/dev/" + "A" * 32, events[0])
        assert (status, body["error"]["code"]) == (404, "unknown_route")
        # With Redis away the receiver does not acknowledge what it could not store.
        redis_server.stop()
        status, body = await callback(session, receivers[1], skytells.hooks[0], {"id": "pred_1", "n": 9})
        assert (status, body["error"]["code"]) == (503, "webhooks_unavailable")


async def test_a_delivery_held_by_a_sigkilled_replica_is_finished_by_another(
    redis_server: RedisServer, start_replicas: Replicas, skytells: Skytells, app_target: App
) -> None:
    secret = new_secret()
    receivers: list[str] = []
    table = webhooks_table(secret, receivers)
    app_target.hold = asyncio.Event()
    (first,) = start_replicas(redis_server.url, count=1, upstream=skytells.url, extra=table)
    async with aiohttp.ClientSession() as session:
        await create(session, first, app_target.url)
        event = {"id": "pred_1", "status": "succeeded"}
        assert (await callback(session, receivers[0], skytells.hooks[0], event))[0] == 200
        await eventually(lambda: len(app_target.hits) == 1, "the first replica's attempt, left hanging")
        # The second replica starts while the first holds the claim, renewing it.
        (second,) = start_replicas(redis_server.url, count=1, upstream=skytells.url, extra=table)
        assert len(app_target.hits) == 1
        first.signal(signal.SIGKILL)
        first.wait(10)
        await eventually(lambda: len(app_target.hits) == 2, "taken over after the claim's lease", 20)
        (held, _, _), (finished, body, headers) = app_target.hits
        assert held == finished  # the same webhook-id: the app can tell it is one event
        assert json.loads(body) == event
        Webhook(secret).verify(body, headers)

        async def drained() -> bool:
            async with session.get(f"{second.url}/-/status") as r:
                return bool((await r.json())["webhooks"]["outbox_depth"] == 0)

        await eventually(drained, "the outbox empty once the second replica delivered")
    assert "is unavailable" not in second.stderr()
