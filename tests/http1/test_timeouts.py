"""The client's own clocks: connect, read-idle and write timeouts, on raw socket upstreams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from helpers.raw_upstream import TIMEOUT, Peer, RawUpstream, answer, upload

from skyproxy.http1 import (
    Client,
    ConnectTimeout,
    Origin,
    ReadTimeout,
    Resolver,
    Response,
    Timeouts,
    WriteTimeout,
)
from skyproxy.http1.dns import Address

QUICK = 0.3  # seconds: each timeout under test; a tick is a quarter of it


async def ask(client: Client, upstream: RawUpstream, body: object = None) -> Response:
    origin = Origin.parse(upstream.url)
    return await asyncio.wait_for(
        client.request("POST", origin, "/v1/a", b"", body),  # type: ignore[arg-type]
        TIMEOUT,
    )


async def test_no_answer_at_all_is_a_read_timeout(raw_server):
    async def silent(peer: Peer) -> None:
        await peer.request()
        await peer.until_eof()

    upstream = await raw_server(silent)
    client = Client(Timeouts(read=QUICK))
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(ReadTimeout, match=r"upstream sent nothing for 0\.3 s"):
            await ask(client, upstream)
        assert loop.time() - started >= QUICK
        await upstream.wait_eof(1)
        assert client.connections == 0
    finally:
        await client.close()


async def test_a_body_that_stops_is_a_read_timeout_after_what_arrived(raw_server):
    async def stalls(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await peer.until_eof()

    upstream = await raw_server(stalls)
    client = Client(Timeouts(read=QUICK))
    try:
        async with await ask(client, upstream) as response:
            pieces = []
            with pytest.raises(ReadTimeout):
                async for piece in response.iter_any():
                    pieces.append(piece)
            assert pieces == [b"x" * 10]
        await upstream.wait_eof(1)
    finally:
        await client.close()


async def test_a_slow_but_steady_answer_is_not_timed_out(raw_server):
    async def trickles(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n")
            for _ in range(12):
                await asyncio.sleep(QUICK / 3)  # the upstream's pace: slower in all than the timeout
                await peer.send(b"x")

    upstream = await raw_server(trickles)
    client = Client(Timeouts(read=QUICK))
    try:
        async with await ask(client, upstream) as response:
            assert await asyncio.wait_for(response.read(), TIMEOUT) == b"x" * 12
    finally:
        await client.close()


async def test_no_read_timeout_while_the_reader_is_the_slow_one(raw_server):
    size = 4 * 1024 * 1024  # well over the high-water mark: reading pauses for the reader

    async def fast(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"y" * size)

    upstream = await raw_server(fast)
    client = Client(Timeouts(read=QUICK))
    try:
        async with await ask(client, upstream) as response:
            got = 0
            async for piece in response.iter_any():
                if got == 0:
                    await asyncio.sleep(3 * QUICK)  # a slow reader, while the upstream waits on it
                got += len(piece)
            assert got == size
    finally:
        await client.close()


async def test_an_upstream_that_takes_no_body_is_a_write_timeout(raw_server):
    async def deaf(peer: Peer) -> None:
        await peer.request(body=False)  # the head, and never a byte of the body
        await asyncio.sleep(TIMEOUT)

    upstream = await raw_server(deaf)
    client = Client(Timeouts(write=QUICK, read=TIMEOUT))
    try:
        with pytest.raises(WriteTimeout, match=r"upstream took none of the request for 0\.3 s"):
            await ask(client, upstream, upload(256 * 1024 * 1024))
        assert client.connections == 0
    finally:
        await client.close()


async def test_a_slow_but_steady_reader_of_the_body_is_not_timed_out(raw_server):
    async def slow_reader(peer: Peer) -> None:
        seen = await peer.request(body=False)
        assert seen is not None
        total = int(seen.headers["Content-Length"])
        while total:
            await asyncio.sleep(QUICK / 3)
            piece = min(total, 1024 * 1024)
            await peer.reader.readexactly(piece)
            total -= piece
        await peer.send(answer(200, b"{}"))

    upstream = await raw_server(slow_reader)
    client = Client(Timeouts(write=QUICK))
    size = 8 * 1024 * 1024

    async def body() -> AsyncIterator[bytes]:
        async for piece in upload(size):
            yield piece

    try:
        origin = Origin.parse(upstream.url)
        response = await asyncio.wait_for(client.request("POST", origin, "/v1/a", b"", body(), size), TIMEOUT)
        async with response:
            assert await response.read() == b"{}"
    finally:
        await client.close()


class HangingResolver(Resolver):
    async def _lookup(self, host: str, port: int) -> list[Address]:
        await asyncio.sleep(TIMEOUT)
        return []


async def test_the_connect_timeout_covers_the_name_lookup():
    client = Client(Timeouts(connect=QUICK), resolver=HangingResolver())
    try:
        with pytest.raises(ConnectTimeout, match=r"after 0\.3 s"):
            await asyncio.wait_for(
                client.request("GET", Origin.parse("http://upstream.test"), "/", b"", None), TIMEOUT
            )
    finally:
        await client.close()
