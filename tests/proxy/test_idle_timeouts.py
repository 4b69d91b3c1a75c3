"""upstream_timeout bounds the wait for the answer's head; idle_timeout the silences inside a body.

A body that keeps moving is never cut, however long it takes; one that stops for longer
than idle_timeout, either way, is. Short values keep every test quick; each one's
counterpart on the old whole-exchange deadline would have waited far longer, or cut.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from helpers import env_config
from helpers.daemon import eventually
from helpers.http import assert_error, host_of, http_head, read_response
from yarl import URL

USER = {"X-User-Id": "alice"}


def timeouts(upstream: str, *, head: float, idle: float, extra: str = "") -> str:
    return env_config(upstream, server=f"upstream_timeout = {head}\nidle_timeout = {idle}\n{extra}")


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    target = URL(url)
    assert target.host is not None and target.port is not None
    return await asyncio.open_connection(target.host, target.port)


def counting_app(received: list[int]) -> web.Application:
    async def swallow(request: web.Request) -> web.Response:
        received.append(len(await request.read()))
        return web.json_response({"size": received[-1]})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/upload", swallow)
    return app


# -- the client's body ---------------------------------------------------------------------


@pytest.mark.parametrize("declared", [1_000, 1_000_000])  # read whole, and streamed on
async def test_a_request_body_that_stops_arriving_is_408_after_idle_timeout(
    declared, raw_upstream, start_proxy, canary_env
):
    received: list[int] = []
    proxy = await start_proxy(timeouts(await raw_upstream(counting_app(received)), head=30, idle=0.5))
    reader, writer = await open_raw(proxy.url)
    try:
        head = [("Host", host_of(proxy.url)), ("Content-Length", str(declared))]
        writer.write(http_head("POST", "/v1/upload", head) + b"x" * 10)  # then silence
        answer = await asyncio.wait_for(read_response(reader), 10)
        assert_error(408, "body_timeout", answer)
        assert answer.headers.get("Connection", "").lower() == "close"
        assert received == []
    finally:
        writer.close()


async def test_an_upload_that_keeps_moving_outlasts_both_timeouts(raw_upstream, start_proxy, canary_env):
    received: list[int] = []
    proxy = await start_proxy(timeouts(await raw_upstream(counting_app(received)), head=1, idle=1))

    async def trickle():  # type: ignore[no-untyped-def]
        for _ in range(12):  # 3 s in all, a piece every 0.25 s
            yield b"y" * 100_000
            await asyncio.sleep(0.25)

    async with proxy.session.post(f"{proxy.url}/v1/upload", data=trickle()) as r:
        assert r.status == 200, await r.text()
        assert await r.json() == {"size": 1_200_000}


async def test_an_upstream_that_stops_taking_the_body_is_504(raw_upstream, start_proxy, canary_env):
    release = asyncio.Event()

    async def never_read(request: web.Request) -> web.Response:
        await release.wait()  # reads nothing: the proxy's writes back up
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/upload", never_read)
    upstream = await raw_upstream(app)
    proxy = await start_proxy(timeouts(upstream, head=30, idle=0.5, extra="max_body_bytes = 209715200"))

    async def flood():  # type: ignore[no-untyped-def]
        for _ in range(200):
            yield b"z" * 1_048_576

    async def post() -> tuple[int, str]:
        async with proxy.session.post(f"{proxy.url}/v1/upload", data=flood()) as r:
            return r.status, await r.text()

    try:
        # The proxy may answer and close while the client is still writing: the client
        # then sees either the 504 or a broken connection. The proxy's count says which.
        (result,) = await asyncio.gather(asyncio.wait_for(post(), 10), return_exceptions=True)
        requests = proxy.state.metrics.requests
        await eventually(lambda: any(status == 504 for _, _, status in requests), "a 504 answered")
        if not isinstance(result, BaseException):
            assert result[0] == 504 and '"upstream_timeout"' in result[1], result
    finally:
        release.set()


# -- the answer's body ------------------------------------------------------------------------


def events_app(count: int, every: float, silent_after: int | None = None) -> web.Application:
    """SSE: `count` events `every` seconds; after `silent_after` events, silence for a minute."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(count):
            if n == silent_after:
                await asyncio.sleep(60)
            await response.write(f"data: {n}\n\n".encode())
            await asyncio.sleep(every)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    return app


async def test_a_stream_that_keeps_flowing_outlasts_upstream_timeout(raw_upstream, start_proxy, canary_env):
    # Ten events over five seconds, against a two-second upstream_timeout.
    upstream = await raw_upstream(events_app(10, 0.5))
    proxy = await start_proxy(timeouts(upstream, head=2, idle=1.5))
    async with proxy.session.post(f"{proxy.url}/v1/chat/completions", json={}, headers=USER) as r:
        assert r.status == 200
        body = await asyncio.wait_for(r.read(), 20)
    assert body == b"".join(f"data: {n}\n\n".encode() for n in range(10))


async def test_a_stream_silent_longer_than_idle_timeout_is_cut_detectably(
    raw_upstream, start_proxy, canary_env
):
    upstream = await raw_upstream(events_app(5, 0.05, silent_after=2))
    proxy = await start_proxy(timeouts(upstream, head=30, idle=0.5))
    async with proxy.session.post(f"{proxy.url}/v1/chat/completions", json={}, headers=USER) as r:
        assert r.status == 200
        assert await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10) == b"data: 0\n\n"
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(r.read(), 10)  # well before the minute of silence ends


async def test_a_client_that_stops_reading_is_cut_after_idle_timeout(raw_upstream, start_proxy, canary_env):
    cut = asyncio.Event()

    async def flood(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        try:
            for _ in range(10_000):  # 640 MB: far more than any buffer on the way holds
                await response.write(b"f" * 65_536)
        finally:
            cut.set()  # cancelled (or a failed write): the proxy let go of the upstream
        return response

    app = web.Application()
    app.router.add_get("/v1/files/big", flood)
    proxy = await start_proxy(timeouts(await raw_upstream(app), head=30, idle=0.5))
    reader, writer = await open_raw(proxy.url)
    try:
        writer.write(http_head("GET", "/v1/files/big", [("Host", host_of(proxy.url))]))
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
        # Then read nothing: the proxy's writes stop moving.
        await asyncio.wait_for(cut.wait(), 15)
        requests = proxy.state.metrics.requests
        await eventually(lambda: sum(requests.values()) == 1, "the exchange counted as over")
    finally:
        writer.close()


async def test_the_upstream_client_s_own_clocks_stay_behind_the_proxy_s(
    mock_upstream, start_proxy, canary_env
):
    # The client's read and write timeouts are backstops: a long upstream_timeout or
    # idle_timeout must not be cut short by them.
    url, _ = mock_upstream
    proxy = await start_proxy(timeouts(url, head=900, idle=600))
    client = proxy.server._listeners.clients["dev"]
    assert client.timeouts.read > 900 and client.timeouts.write > 600
