"""upstream_timeout bounds the wait for the answer's head; idle_timeout the silences inside a body.

A body that keeps moving is never cut, however long it takes; one that stops for longer
than idle_timeout, either way, is. Short values keep every test quick; each one's
counterpart on the old whole-exchange deadline would have waited far longer, or cut.
"""

from __future__ import annotations

import asyncio

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
