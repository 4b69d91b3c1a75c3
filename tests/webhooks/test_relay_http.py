"""The relay on the wire, against real and raw app servers: reuse, redirects, odd answers, safe headers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers.daemon import eventually
from helpers.webhooks import Target, add_route, start_target, statuses

from skyproxy.config.settings import DEFAULT_ALLOWED_TARGETS
from skyproxy.webhooks.relay import Relay, RelayConfig
from skyproxy.webhooks.signing import SigningKeys, SigningSecret, new_secret
from skyproxy.webhooks.stats import WebhookStats
from skyproxy.webhooks.store import Store, StoreThread

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def store_events(
    path: Path, url: str, bodies: list[bytes], content_type: str = "application/json"
) -> list[str]:
    route = add_route(path, url)
    store = Store(path)
    try:
        return [
            store.receive("dev", route, body, content_type, None, None, time.time()).event_id  # type: ignore[misc]
            for body in bodies
        ]
    finally:
        store.close()


@asynccontextmanager
async def relaying(
    path: Path, timeout: float = 60.0, schedule: tuple[float, ...] = (0.1,)
) -> AsyncIterator[Relay]:
    db = await StoreThread.open(path)
    keys = SigningKeys(SigningSecret(new_secret()))
    relay = Relay(
        db,
        RelayConfig(DEFAULT_ALLOWED_TARGETS, schedule, keys),
        WebhookStats(),
        poll_interval=0.1,
        timeout=timeout,
    )
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop(timeout=1.0)
        await db.close()


@asynccontextmanager
async def raw_app(handle: Handler) -> AsyncIterator[str]:
    """An app on a raw socket server, for answers no framework would send."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}/hooks"
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return head


async def test_deliveries_to_one_app_reuse_its_connection(tmp_path: Path, servers: list[TestServer]) -> None:
    peers: list[object] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        # Not a 204 (after one the client never reuses a connection), and the body apart
        # from the head, so that keeping the connection takes reading the body.
        response = web.StreamResponse()
        response.content_length = 2
        await response.prepare(request)
        await asyncio.sleep(0.05)
        await response.write(b"ok")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/hooks", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    servers.append(server)
    path = tmp_path / "w.sqlite3"
    url = str(server.make_url("/hooks"))
    async with relaying(path):
        for n in range(3):  # one at a time, so each can take the connection the last one left
            [event_id] = store_events(path, url, [b"%d" % n])
            await eventually(
                lambda event_id=event_id: statuses(path)[event_id][0] == "delivered", "delivered"
            )  # type: ignore[misc]
    assert len(peers) == 3
    assert len(set(peers)) == 1


async def test_a_redirect_is_not_followed(tmp_path: Path, servers: list[TestServer]) -> None:
    elsewhere = await start_target(servers)
    target = await start_target(
        servers, Target(answer=lambda n: web.Response(status=302, headers={"Location": elsewhere.url}))
    )
    path = tmp_path / "w.sqlite3"
    [event_id] = store_events(path, target.url, [b"{}"])
    async with relaying(path, schedule=(0.1, 0.1)):
        await eventually(lambda: statuses(path)[event_id][0] == "dead", "dead")
    assert statuses(path)[event_id] == ("dead", 3, "HTTP 302")
    assert len(target.hits) == 3 and elsewhere.hits == []


async def test_a_2xx_whose_body_never_ends_is_delivered_at_once(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await release.wait()  # and no last chunk, ever
        writer.close()

    path = tmp_path / "w.sqlite3"
    async with raw_app(endless) as url, relaying(path):
        [event_id] = store_events(path, url, [b"{}"])
        await eventually(lambda: statuses(path)[event_id][:2] == ("delivered", 1), "delivered")
        release.set()


async def test_a_2xx_that_announces_more_body_than_it_sends_is_delivered(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 10\r\n\r\nhalf")
        await writer.drain()
        await release.wait()
        writer.close()

    path = tmp_path / "w.sqlite3"
    # A short attempt timeout: the read of the announced body gives up at it, the status stands.
    async with raw_app(short) as url, relaying(path, timeout=0.5):
        [event_id] = store_events(path, url, [b"{}"])
        await eventually(lambda: statuses(path)[event_id][:2] == ("delivered", 1), "delivered")
        release.set()


async def test_request_bytes_cannot_be_injected_and_odd_paths_are_encoded(tmp_path: Path) -> None:
    heads: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_request(reader))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        writer.close()

    path = tmp_path / "w.sqlite3"
    async with raw_app(record) as url, relaying(path):
        [event_id] = store_events(
            path, url + "/caf\u00e9?q=a%20b", [b"{}"], content_type="text/plain\r\nX-Injected: 1"
        )
        await eventually(lambda: statuses(path)[event_id][0] == "delivered", "delivered")
    [head] = heads
    assert head.startswith(b"POST /hooks/caf%C3%A9?q=a%20b HTTP/1.1\r\n")
    assert b"X-Injected" not in head
    assert b"\r\nContent-Type: application/json\r\n" in head
