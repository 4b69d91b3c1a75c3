"""Webhook test helpers: a recording app target, Skytells-style signing, a receiver on port 0."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from skyproxy.webhooks.receiver import Arrival, Receiver
from skyproxy.webhooks.relay import Relay
from skyproxy.webhooks.signing import skytells_signature
from skyproxy.webhooks.stats import WebhookStats
from skyproxy.webhooks.store import Route, Store, StoreThread, new_route_id


@dataclass
class Hooks:
    url: str  # the receiver's base URL
    store_path: Path
    db: StoreThread
    receiver: Receiver
    relay: Relay
    stats: WebhookStats
    secret: str  # the relay's whsec_ secret
    arrivals: list[Arrival] = field(default_factory=list)


@dataclass
class Hit:
    headers: CIMultiDict[str]
    body: bytes
    at: float
    raw: bytes  # the request as it arrived: head and body


@dataclass
class Target:
    """An app that receives relayed webhooks; `answer` decides each reply."""

    url: str = ""
    hits: list[Hit] = field(default_factory=list)
    answer: Callable[[int], Awaitable[web.StreamResponse] | web.StreamResponse] | None = None
    active: int = 0
    most_active: int = 0

    def ids(self) -> list[str]:
        return [h.headers["webhook-id"] for h in self.hits]


async def start_target(servers: list[TestServer], target: Target | None = None) -> Target:
    target = target or Target()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        head = b"".join(name + b": " + value + b"\r\n" for name, value in request.raw_headers)
        target.hits.append(Hit(CIMultiDict(request.headers), body, time.monotonic(), head + body))
        target.active += 1
        target.most_active = max(target.most_active, target.active)
        try:
            if target.answer is None:
                return web.Response(status=204)
            reply = target.answer(len(target.hits))
            return await reply if asyncio.iscoroutine(reply) else reply  # type: ignore[return-value]
        finally:
            target.active -= 1

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    servers.append(server)
    target.url = str(server.make_url("/hooks/app"))
    return target


def signed(body: bytes, key: str) -> dict[str, str]:
    return {
        "X-Skytells-Signature": skytells_signature(key.encode(), body),
        "Content-Type": "application/json",
    }


def add_route(store_path: Path, target: str, environment: str = "dev") -> str:
    store = Store(store_path)
    try:
        route_id = new_route_id()
        store.add_route(Route(route_id, environment, target, ("completed",), "alice", "req-1", time.time()))
        return route_id
    finally:
        store.close()


def file_bytes(path: Path) -> bytes:
    """The store's bytes on disk, its write-ahead log included."""
    found = b""
    for candidate in (path, path.with_name(path.name + "-wal")):
        if candidate.exists():
            found += candidate.read_bytes()
    return found


def statuses(path: Path) -> dict[str, tuple[str, int, str | None]]:
    """Each stored event's delivery: status, attempts, last error."""
    store = Store(path)
    try:
        return {x.id: (x.status, x.attempts, x.last_error) for x in store.listing()}
    finally:
        store.close()
