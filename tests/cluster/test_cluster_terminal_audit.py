"""The terminal audit line across replicas: one line per prediction in total, whichever
replicas the polls land on and however they race."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import CANARY, Daemon, free_port
from helpers.daemon import eventually
from helpers.redis_server import RedisServer

from skyproxy.webhooks.signing import new_secret, skytells_signature

Replicas = Callable[..., list[Daemon]]


@pytest.fixture
async def skytells() -> AsyncIterator[str]:
    """One upstream for every replica: creates get sequential ids, every poll says succeeded;
    the webhook URL a create carried is at GET /hooks-seen/{id}."""
    created: list[str] = []
    hooks: dict[str, str] = {}

    async def create(request: web.Request) -> web.Response:
        created.append(f"pred_{len(created) + 1}")
        body = await request.json()
        if "webhook" in body:
            hooks[created[-1]] = body["webhook"]["url"]
        return web.json_response({"id": created[-1], "status": "starting"}, status=201)

    async def poll(request: web.Request) -> web.Response:
        pid = request.match_info["pid"]
        return web.json_response({"id": pid, "status": "succeeded", "model": "truefusion-pro"})

    async def seen(request: web.Request) -> web.Response:
        return web.json_response(hooks[request.match_info["pid"]])

    app = web.Application()
    app.router.add_post("/v1/predictions", create)
    app.router.add_get("/v1/predictions/{pid}", poll)
    app.router.add_get("/hooks-seen/{pid}", seen)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


def audit_lines(folder: Path) -> list[dict[str, object]]:
    path = folder / "audit" / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def create(session: aiohttp.ClientSession, replica: Daemon, **extra: object) -> str:
    body = {"model": "truefusion-pro", "input": {}, **extra}
    async with session.post(f"{replica.url}/v1/predictions", json=body, headers={"X-User-Id": "alice"}) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["id"])


async def poll(session: aiohttp.ClientSession, replica: Daemon, pid: str) -> None:
    async with session.get(f"{replica.url}/v1/predictions/{pid}", headers={"X-User-Id": "alice"}) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["status"] == "succeeded"


async def test_one_terminal_line_per_prediction_across_three_replicas(
    tmp_path: Path, redis_server: RedisServer, start_replicas: Replicas, skytells: str
) -> None:
    replicas = start_replicas(redis_server.url, upstream=skytells)
    folders = [tmp_path / f"replica-{i}" for i in range(3)]
    # One connection per replica: a server reads a connection's next request only once the
    # previous handler has returned, its terminal claim included.
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in replicas]
    try:
        predictions = [await create(sessions[i], replicas[i]) for i in range(3)]
        # Every replica polls every prediction twice, all at once.
        await asyncio.gather(
            *(poll(sessions[i], replicas[i], pid) for pid in predictions for i in range(3) for _ in range(2))
        )
        # A later create on each replica's connection: once its line is written, whatever
        # that replica decided about the polls before it is in its file too.
        later = [await create(sessions[i], replicas[i]) for i in range(3)]
    finally:
        for session in sessions:
            await session.close()

    def later_lines_written() -> bool:
        return all(
            any(line["predictionId"] == later[i] for line in audit_lines(folders[i])) for i in range(3)
        )

    await eventually(later_lines_written, "each replica's later create in its audit file")
    lines = [line for folder in folders for line in audit_lines(folder)]
    terminal = [line for line in lines if line["status"] == "succeeded"]
    assert sorted(str(line["predictionId"]) for line in terminal) == sorted(predictions), terminal
    assert all(line["userId"] == "alice" for line in terminal)
    created = [line["predictionId"] for line in lines if line["status"] == "created"]
    assert sorted(str(pid) for pid in created) == sorted(predictions + later)


async def test_a_webhook_on_one_replica_and_a_poll_on_another_make_one_line(
    tmp_path: Path, redis_server: RedisServer, start_replicas: Replicas, skytells: str
) -> None:
    receivers: list[str] = []

    def webhooks(folder: Path) -> str:
        (folder / "whsec").write_text(new_secret() + "\n")
        port = free_port()
        receivers.append(f"http://127.0.0.1:{port}")
        return (
            f'[webhooks]\nlisten = ["127.0.0.1:{port}"]\npublic_url = "http://127.0.0.1:{port}"\n'
            'signing_secret = "file:whsec"\nstore = "state/webhooks.sqlite3"\n'
        )

    replicas = start_replicas(redis_server.url, count=2, upstream=skytells, extra=webhooks)
    folders = [tmp_path / f"replica-{i}" for i in range(2)]
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in replicas]
    try:
        hook = {"url": "http://127.0.0.1:9/app", "events": ["completed"]}
        pid = await create(sessions[0], replicas[0], webhook=hook)
        async with sessions[0].get(f"{skytells}/hooks-seen/{pid}") as r:
            route = str(await r.json()).split("/hooks/", 1)[1]
        body = json.dumps({"id": pid, "status": "succeeded"}).encode()
        headers = {"X-Skytells-Signature": skytells_signature(CANARY.encode(), body)}
        async with sessions[0].post(f"{receivers[0]}/hooks/{route}", data=body, headers=headers) as r:
            assert r.status == 200, await r.text()
        await eventually(
            lambda: any(line["status"] == "succeeded" for line in audit_lines(folders[0])),
            "the webhook's terminal line on the replica that received it",
        )
        await poll(sessions[1], replicas[1], pid)
        later = await create(sessions[1], replicas[1])
    finally:
        for session in sessions:
            await session.close()
    await eventually(
        lambda: any(line["predictionId"] == later for line in audit_lines(folders[1])),
        "the polling replica's later create in its audit file",
    )
    terminal = [line for f in folders for line in audit_lines(f) if line["status"] == "succeeded"]
    assert len(terminal) == 1, terminal
    assert terminal[0]["path"] == "/hooks/dev"
