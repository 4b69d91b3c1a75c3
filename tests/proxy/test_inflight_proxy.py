"""In-flight caps and budget reservations through a real proxy, released however the exchange
ends: completion, a client that disconnects, an upstream timeout, an unreachable upstream."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web
from helpers import env_config, free_port
from helpers.access import Recorder
from helpers.daemon import CREATE, audit_lines, eventually
from helpers.http import assert_error, fetch

CAPPED = (
    "[[rate_limit.rules]]\nname = 'all'\nmethods = ['GET', 'POST']\npaths = ['/v1/*']\n"
    "per_user = '1000/second'\nmax_in_flight = {n}\n"
)
USER = {"X-User-Id": "alice"}


async def post(proxy: Any, user: str = "alice") -> tuple[int, Any, bytes]:
    return await fetch(
        proxy.session, "POST", f"{proxy.url}/v1/predictions", json=CREATE, headers={"X-User-Id": user}
    )


def counts(proxy: Any) -> dict[Any, int]:
    return dict(proxy.state.runtime.inflight.counts)


async def test_the_one_over_the_cap_gets_429_with_retry_after_1(
    canary_env: str, start_proxy: Callable[..., Any], raw_upstream: Callable[..., Any]
) -> None:
    upstream = Recorder(hold=asyncio.Event())
    url = await raw_upstream(upstream.app())
    proxy = await start_proxy(env_config(url, rules=CAPPED.format(n=2)))
    held = [asyncio.create_task(post(proxy)) for _ in range(2)]
    await eventually(lambda: upstream.creates == 2, "two creates upstream")
    status, headers, body = await post(proxy)
    assert_error(429, "too_many_in_flight", (status, headers, body))
    assert headers["Retry-After"] == "1"
    assert json.loads(body)["error"]["retry_after"] == 1
    assert upstream.hold is not None
    upstream.hold.set()
    assert [s for s, _, _ in await asyncio.gather(*held)] == [201, 201]
    assert counts(proxy) == {}
    assert (await post(proxy))[0] == 201
    _, _, metrics = await fetch(proxy.session, "GET", f"{proxy.url}/-/metrics")
    assert (
        'skyproxy_client_refusals_total{environment="dev",reason="too_many_in_flight"} 1.0'
        in metrics.decode()
    )


@contextlib.asynccontextmanager
async def endless_stream(raw_upstream: Callable[..., Any]) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """An upstream whose answers stream events until the test ends."""
    done = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            while not done.is_set():
                await response.write(b'data: {"status": "processing"}\n\n')
                await asyncio.sleep(0.02)
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    try:
        yield await raw_upstream(app), done
    finally:
        done.set()


async def test_a_client_that_disconnects_gives_its_slot_back(
    canary_env: str, start_proxy: Callable[..., Any], raw_upstream: Callable[..., Any]
) -> None:
    async with endless_stream(raw_upstream) as (url, _):
        proxy = await start_proxy(env_config(url, rules=CAPPED.format(n=1)))
        async with aiohttp.ClientSession() as session:
            response = await session.get(f"{proxy.url}/v1/stream", headers=USER)
            assert response.status == 200
            await response.content.readany()
            assert counts(proxy) == {("dev", "all", "alice"): 1}
            assert_error(
                429,
                "too_many_in_flight",
                await fetch(proxy.session, "GET", f"{proxy.url}/v1/x", headers=USER),
            )
            response.close()  # the client goes away mid-stream
        await eventually(lambda: counts(proxy) == {}, "the slot released after the disconnect")
        second = await proxy.session.get(f"{proxy.url}/v1/stream", headers=USER)
        assert second.status == 200
        second.close()


async def test_a_timeout_and_an_unreachable_upstream_give_the_slot_back(
    canary_env: str, start_proxy: Callable[..., Any], raw_upstream: Callable[..., Any]
) -> None:
    upstream = Recorder(hold=asyncio.Event())
    url = await raw_upstream(upstream.app())
    proxy = await start_proxy(env_config(url, rules=CAPPED.format(n=1), server="upstream_timeout = 0.3"))
    assert_error(504, "upstream_timeout", await post(proxy))
    assert counts(proxy) == {}
    closed = await start_proxy(env_config(f"http://127.0.0.1:{free_port()}", rules=CAPPED.format(n=1)), "dev")
    assert_error(502, "upstream_unreachable", await post(closed))
    assert counts(closed) == {}
    assert upstream.hold is not None
    upstream.hold.set()


async def test_a_disconnect_keeps_the_spend_the_upstream_reported_and_frees_the_reservation(
    canary_env: str, start_proxy: Callable[..., Any], raw_upstream: Callable[..., Any]
) -> None:
    upstream = Recorder(hold=asyncio.Event())
    url = await raw_upstream(upstream.app())
    budget = "[pricing]\ntruefusion-pro = 0.1\n" + '[[budgets]]\nname = "cap"\nper = "user"\nusd = 1.0\n'
    budget += 'period = "day"\n'
    proxy = await start_proxy(env_config(url, rules=CAPPED.format(n=5), extra=budget))
    leaving = asyncio.create_task(post(proxy))
    await eventually(lambda: upstream.creates == 1, "the create upstream")
    row = proxy.state.budgets.snapshot()[0]
    assert (row["spent_usd"], row["reserved_usd"]) == (0.0, 0.1)
    leaving.cancel()  # the client disconnects while the upstream works on it
    with contextlib.suppress(asyncio.CancelledError):
        await leaving
    assert upstream.hold is not None
    upstream.hold.set()  # the upstream creates the prediction anyway
    await eventually(lambda: audit_lines(proxy.audit_path), "the create audited")
    line = audit_lines(proxy.audit_path)[0]
    assert (line["status"], line["predictionId"], line["costUsd"]) == ("created", "pred_0001", 0.1)
    await eventually(lambda: counts(proxy) == {}, "the slot released")
    row = proxy.state.budgets.snapshot()[0]
    assert (row["spent_usd"], row["reserved_usd"]) == (0.1, 0.0)
