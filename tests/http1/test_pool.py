"""The pool, straight on Client: reuse, idle expiry, bounds, waiting, release, DNS.

Upstreams are raw asyncio servers on ephemeral ports; nothing of the client is mocked.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from helpers.raw_upstream import TIMEOUT, Peer, RawUpstream, answer, echo, keep_alive, poll

from skyproxy.http1 import (
    Client,
    ConnectFailed,
    Disconnected,
    Limits,
    Origin,
    PoolTimeout,
    Resolver,
    Timeouts,
    UpstreamError,
)
from skyproxy.http1.dns import Address


async def exchange(
    client: Client, origin: Origin, target: str, method: str = "GET", body: bytes | None = None
) -> tuple[int, bytes]:
    """One request straight through the client: the status and the whole body."""
    response = await asyncio.wait_for(
        client.request(method, origin, target, b"x-api-key: k\r\n", body), TIMEOUT
    )
    async with response:
        return response.status, await asyncio.wait_for(response.read(), TIMEOUT)


# -- Origin -------------------------------------------------------------------------------------


def test_origin_parse():
    assert Origin.parse("https://api.skytells.ai") == Origin(True, "api.skytells.ai", 443, b"api.skytells.ai")
    assert Origin.parse("http://127.0.0.1:8080") == Origin(False, "127.0.0.1", 8080, b"127.0.0.1:8080")
    assert Origin.parse("http://example.com").port == 80
    assert Origin.parse("http://[::1]:8080") == Origin(False, "::1", 8080, b"[::1]:8080")
    # Userinfo never reaches the Host header.
    assert Origin.parse("https://user:secret@api.example.com").authority == b"api.example.com"
    for bad in ("ftp://example.com", "example.com", "https://", "mock"):
        with pytest.raises(ValueError):
            Origin.parse(bad)


# -- the pool, straight on Client ---------------------------------------------------------------


async def test_idle_connection_expires_after_keepalive(raw_server):
    upstream = await raw_server(keep_alive)
    client = Client(limits=Limits(keepalive=0.2))
    origin = Origin.parse(upstream.url)
    loop = asyncio.get_running_loop()
    try:
        status, _ = await exchange(client, origin, "/v1/a")
        assert status == 200
        released = loop.time()
        assert client.connections == 1
        await upstream.wait_eof(1)  # the client closed it, idle for longer than 0.2 s
        assert loop.time() - released >= 0.15  # and not at once
        assert client.connections == 0
        status, body = await exchange(client, origin, "/v1/b")
        assert (status, json.loads(body)["connection"]) == (200, 2)
        assert upstream.connections == 2
    finally:
        await client.close()


async def test_connection_the_upstream_closed_while_idle_is_not_used(raw_server):
    async def once(peer: Peer) -> None:
        seen = await peer.request()
        if seen is not None:
            await peer.send(echo(seen))  # keep-alive by its headers, then closed anyway
        if peer.number > 1:
            await keep_alive(peer)

    upstream = await raw_server(once)
    client = Client()
    origin = Origin.parse(upstream.url)
    try:
        assert (await exchange(client, origin, "/v1/a"))[0] == 200
        await poll(lambda: client.connections == 0)
        # Not idempotent, so not retried: it must go out on a fresh connection to succeed.
        status, body = await exchange(client, origin, "/v1/b", "POST", b"{}")
        assert (status, json.loads(body)["connection"]) == (200, 2)
        assert [(s.method, s.connection) for s in upstream.seen] == [("GET", 1), ("POST", 2)]
    finally:
        await client.close()


async def test_close_closes_pooled_connections(raw_server):
    upstream = await raw_server(keep_alive)
    client = Client()
    origin = Origin.parse(upstream.url)
    results = await asyncio.gather(*(exchange(client, origin, f"/v1/{n}") for n in range(3)))
    assert [status for status, _ in results] == [200] * 3
    assert client.connections == upstream.connections == 3
    await client.close()
    for n in (1, 2, 3):
        await upstream.wait_eof(n)
    assert client.connections == 0


SECOND_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Unasked: yes\r\n\r\nextra"


# -- bounds: connections per origin, idle ones kept, waiting for a free one ---------------------


def gated(gate: asyncio.Event) -> object:
    """An upstream that reads each request at once but answers only once `gate` is set."""

    async def script(peer: Peer) -> None:
        while (seen := await peer.request()) is not None:
            await asyncio.wait_for(gate.wait(), TIMEOUT)
            await peer.send(echo(seen))

    return script


async def test_at_max_connections_a_request_waits_for_a_released_one(raw_server):
    gate = asyncio.Event()
    upstream = await raw_server(gated(gate))
    client = Client(limits=Limits(max_connections=2))
    origin = Origin.parse(upstream.url)
    try:
        tasks = [asyncio.create_task(exchange(client, origin, f"/v1/{n}")) for n in range(3)]
        await poll(lambda: len(upstream.seen) == 2)
        assert upstream.connections == 2  # the third waits in line, unsent
        gate.set()
        results = await asyncio.gather(*tasks)
        assert sorted(json.loads(body)["path"] for _, body in results) == ["/v1/0", "/v1/1", "/v1/2"]
        assert upstream.connections == 2
        assert client.connections == 2
    finally:
        await client.close()


async def test_a_request_waits_at_most_the_pool_timeout(raw_server):
    gate = asyncio.Event()
    upstream = await raw_server(gated(gate))
    client = Client(Timeouts(pool=0.2), Limits(max_connections=1))
    origin = Origin.parse(upstream.url)
    try:
        first = asyncio.create_task(exchange(client, origin, "/v1/first"))
        await poll(lambda: len(upstream.seen) == 1)
        with pytest.raises(PoolTimeout, match=r"no upstream connection free within 0\.2 s"):
            await exchange(client, origin, "/v1/second")
        gate.set()
        assert (await first)[0] == 200
        assert (await exchange(client, origin, "/v1/third"))[0] == 200  # the line is clear again
        assert upstream.connections == 1
    finally:
        await client.close()


async def test_a_closed_connection_leaves_room_for_the_next_in_line(raw_server):
    gate = asyncio.Event()

    async def closing(peer: Peer) -> None:
        seen = await peer.request()
        if seen is not None:
            await asyncio.wait_for(gate.wait(), TIMEOUT)
            await peer.send(answer(200, b"{}", "Connection: close"))
        await peer.until_eof()

    upstream = await raw_server(closing)
    client = Client(limits=Limits(max_connections=1))
    origin = Origin.parse(upstream.url)
    try:
        tasks = [asyncio.create_task(exchange(client, origin, f"/v1/{n}")) for n in range(2)]
        await poll(lambda: len(upstream.seen) == 1)
        gate.set()
        assert [status for status, _ in await asyncio.gather(*tasks)] == [200, 200]
        assert [s.connection for s in upstream.seen] == [1, 2]
    finally:
        await client.close()


async def test_beyond_max_idle_the_oldest_idle_connections_close(raw_server):
    gate = asyncio.Event()
    upstream = await raw_server(gated(gate))
    client = Client(limits=Limits(max_idle=2))
    origin = Origin.parse(upstream.url)
    try:
        tasks = [asyncio.create_task(exchange(client, origin, f"/v1/{n}")) for n in range(4)]
        await poll(lambda: len(upstream.seen) == 4)
        gate.set()
        await asyncio.gather(*tasks)
        assert client.idle == client.connections == 2
        await poll(lambda: sum(event.is_set() for event in upstream.eof.values()) == 2)
        _, body = await exchange(client, origin, "/v1/again")
        assert json.loads(body)["connection"] in {n for n, eof in upstream.eof.items() if not eof.is_set()}
        assert upstream.connections == 4
    finally:
        await client.close()


def test_limits_are_checked():
    with pytest.raises(ValueError):
        Limits(max_connections=0)
    with pytest.raises(ValueError):
        Limits(max_idle=-1)


# -- release: async with, once only -------------------------------------------------------------


async def test_leaving_async_with_unread_closes_the_connection(raw_server):
    async def large(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 1000)
            await peer.until_eof()

    upstream = await raw_server(large)
    client = Client()
    origin = Origin.parse(upstream.url)
    try:
        async with await client.request("GET", origin, "/v1/big", b"", None) as response:
            assert response.status == 200
        await upstream.wait_eof(1)  # half an answer: the connection cannot be reused
        assert client.connections == 0
    finally:
        await client.close()


async def test_leaving_async_with_on_an_error_releases(raw_server):
    upstream = await raw_server(keep_alive)
    client = Client()
    origin = Origin.parse(upstream.url)
    try:
        with pytest.raises(RuntimeError):
            async with await client.request("GET", origin, "/v1/a", b"", None) as response:
                await response.read()
                raise RuntimeError("the caller's own failure")
        assert client.idle == 1  # the answer was whole: the connection went back
        assert (await exchange(client, origin, "/v1/b"))[0] == 200
        assert upstream.connections == 1
    finally:
        await client.close()


async def test_a_second_release_never_touches_the_next_exchange(raw_server):
    upstream = await raw_server(keep_alive)
    client = Client()
    origin = Origin.parse(upstream.url)
    try:
        first = await client.request("GET", origin, "/v1/a", b"", None)
        await first.read()
        first.release()
        second = await client.request("GET", origin, "/v1/b", b"", None)
        first.release()  # late and repeated: must not release or close `second`'s connection
        assert client.idle == 0
        assert json.loads(await second.read()) == {"path": "/v1/b", "connection": 1}
        second.release()
        assert client.idle == 1
    finally:
        await client.close()


# -- names: the DNS cache, addresses tried in order ---------------------------------------------


class FixedResolver(Resolver):
    """Answers every name with the given addresses, counting lookups (the cache is real)."""

    def __init__(self, addresses: list[Address], ttl: float = 300.0) -> None:
        super().__init__(ttl)
        self.addresses = addresses
        self.lookups = 0

    async def _lookup(self, host: str, port: int) -> list[Address]:
        self.lookups += 1
        await asyncio.sleep(0)
        return self.addresses


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_addresses_are_tried_in_order_and_host_stays_the_name(raw_server):
    upstream: RawUpstream = await raw_server(keep_alive)
    port = int(upstream.url.rsplit(":", 1)[1])
    resolver = FixedResolver(
        [(socket.AF_INET, "127.0.0.1", closed_port()), (socket.AF_INET, "127.0.0.1", port)]
    )
    client = Client(resolver=resolver)
    origin = Origin.parse(f"http://upstream.test:{port}")
    try:
        results = await asyncio.gather(*(exchange(client, origin, f"/v1/{n}") for n in range(3)))
        assert [status for status, _ in results] == [200] * 3
        assert resolver.lookups == 1  # three connects, one lookup shared between them
        assert {s.headers["Host"] for s in upstream.seen} == {f"upstream.test:{port}"}
    finally:
        await client.close()


async def test_the_cache_lasts_its_ttl_and_a_name_that_fails_is_asked_again(raw_server):
    upstream: RawUpstream = await raw_server(keep_alive)
    port = int(upstream.url.rsplit(":", 1)[1])
    resolver = FixedResolver([(socket.AF_INET, "127.0.0.1", closed_port())], ttl=300.0)
    client = Client(resolver=resolver, limits=Limits(max_idle=0))
    origin = Origin.parse(f"http://upstream.test:{port}")
    try:
        with pytest.raises(ConnectFailed, match="cannot connect"):
            await exchange(client, origin, "/v1/a")
        resolver.addresses = [(socket.AF_INET, "127.0.0.1", port)]
        assert (await exchange(client, origin, "/v1/b"))[0] == 200
        assert (await exchange(client, origin, "/v1/c"))[0] == 200
        assert resolver.lookups == 2  # asked again after the failure, then cached
        resolver.ttl = 0.0
        resolver.forget("upstream.test", port)
        assert (await exchange(client, origin, "/v1/d"))[0] == 200
        assert (await exchange(client, origin, "/v1/e"))[0] == 200
        assert resolver.lookups == 4  # with no TTL, every connect asks
    finally:
        await client.close()


async def test_a_real_lookup_resolves_localhost(raw_server):
    upstream: RawUpstream = await raw_server(keep_alive)
    port = int(upstream.url.rsplit(":", 1)[1])
    addresses = await Resolver().resolve("localhost", port)
    assert (socket.AF_INET, "127.0.0.1", port) in addresses
    assert await Resolver().resolve("127.0.0.1", port) == [(socket.AF_INET, "127.0.0.1", port)]
    client = Client()
    try:
        assert (await exchange(client, Origin.parse(f"http://localhost:{port}"), "/v1/a"))[0] == 200
    finally:
        await client.close()


async def test_a_name_that_does_not_resolve_is_a_connect_failure():
    client = Client()
    try:
        with pytest.raises(ConnectFailed, match="cannot resolve"):
            await exchange(client, Origin.parse("http://no-such-host.invalid"), "/v1/a")
    finally:
        await client.close()


async def test_a_closed_client_fails_its_waiters(raw_server):
    gate = asyncio.Event()
    upstream = await raw_server(gated(gate))
    client = Client(limits=Limits(max_connections=1))
    origin = Origin.parse(upstream.url)
    first = asyncio.create_task(exchange(client, origin, "/v1/first"))
    await poll(lambda: len(upstream.seen) == 1)
    waiting = asyncio.create_task(exchange(client, origin, "/v1/second"))
    await asyncio.sleep(0)
    await client.close()  # whether `waiting` is in line by now or not, it fails
    with pytest.raises(UpstreamError):
        await waiting
    with pytest.raises(UpstreamError):
        await first


async def test_an_upstream_that_closes_at_once_is_a_disconnect_not_a_loop(raw_server):
    async def rude(peer: Peer) -> None:
        return  # accept, then close without reading a byte

    upstream = await raw_server(rude)
    client = Client()
    try:
        for _ in range(3):
            with pytest.raises(Disconnected):
                await exchange(client, Origin.parse(upstream.url), "/v1/a")
        assert upstream.connections == 3  # one fresh connection each, never retried
    finally:
        await client.close()
