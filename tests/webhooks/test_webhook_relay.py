"""The relay against real app servers: signatures, retries, Retry-After, 410, slow targets, restarts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import CANARY, assert_no_canary
from helpers.daemon import eventually
from helpers.webhooks import Hooks, Target, add_route, file_bytes, signed, start_target, statuses
from standardwebhooks import Webhook

from skyproxy import __version__
from skyproxy.config import TargetPattern
from skyproxy.config.settings import DEFAULT_ALLOWED_TARGETS
from skyproxy.webhooks.relay import Relay, RelayConfig
from skyproxy.webhooks.signing import SigningKeys, SigningSecret, new_secret
from skyproxy.webhooks.stats import WebhookStats
from skyproxy.webhooks.store import Store, StoreThread

BODY = b'{"type":"prediction.succeeded","created_at":"2026-01-01T00:00:00Z","data":{"id":"p-9"}}'


async def post(hooks: Hooks, route: str, body: bytes = BODY) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{hooks.url}/hooks/dev/{route}", data=body, headers=signed(body, CANARY)) as answer,
    ):
        return answer.status


async def test_the_app_gets_the_exact_body_signed_per_standard_webhooks(
    hooks, servers: list[TestServer]
) -> None:
    target = await start_target(servers)
    route = add_route(hooks.store_path, target.url)
    assert await post(hooks, route) == 200
    await eventually(lambda: target.hits, "the relay")
    [hit] = target.hits
    assert hit.body == BODY
    assert hit.headers["Content-Type"] == "application/json"
    assert hit.headers["User-Agent"] == f"skyproxy/{__version__}"
    assert "X-Skytells-Signature" not in hit.headers
    assert abs(int(hit.headers["webhook-timestamp"]) - time.time()) < 60
    verified = Webhook(hooks.secret).verify(hit.body, dict(hit.headers))
    assert verified["data"]["id"] == "p-9"
    [(event_id, (_status, _attempts, _))] = statuses(hooks.store_path).items()
    assert hit.headers["webhook-id"] == event_id
    await eventually(lambda: statuses(hooks.store_path)[event_id][0] == "delivered", "delivered")
    assert statuses(hooks.store_path)[event_id][1] == 1


async def test_the_canary_key_is_in_no_byte_the_app_receives_nor_in_the_store(
    hooks, servers: list[TestServer]
) -> None:
    target = await start_target(servers)
    route = add_route(hooks.store_path, target.url)
    for n in range(3):
        assert await post(hooks, route, BODY + b" " * n) == 200
    await eventually(lambda: len(target.hits) == 3, "three relays")
    for hit in target.hits:
        assert CANARY.encode() not in hit.raw
        assert_no_canary(hit.raw.decode("latin-1"))
    assert CANARY.encode() not in file_bytes(hooks.store_path)
    assert CANARY[-12:].encode() not in file_bytes(hooks.store_path)


async def test_a_target_failing_twice_then_succeeding(hooks: Hooks, servers: list[TestServer]) -> None:
    target = await start_target(servers)
    target.answer = lambda n: web.Response(status=500 if n <= 2 else 200)
    route = add_route(hooks.store_path, target.url)
    assert await post(hooks, route) == 200
    await eventually(lambda: len(target.hits) == 3, "three attempts")
    [event_id] = statuses(hooks.store_path)
    await eventually(lambda: statuses(hooks.store_path)[event_id][:2] == ("delivered", 3), "delivered")
    assert set(target.ids()) == {event_id}  # the same webhook-id on every attempt
    for hit in target.hits:
        Webhook(hooks.secret).verify(hit.body, dict(hit.headers))
    # The counters move once the store's commit is back on the loop: after a reader sees it.
    await eventually(lambda: (hooks.stats.retried, hooks.stats.delivered) == (2, 1), "counted")


async def test_dead_after_the_schedule(hooks: Hooks, servers: list[TestServer]) -> None:
    target = await start_target(servers)
    target.answer = lambda n: web.Response(status=502)
    route = add_route(hooks.store_path, target.url)
    assert await post(hooks, route) == 200
    [event_id] = statuses(hooks.store_path)
    await eventually(lambda: statuses(hooks.store_path)[event_id][0] == "dead", "dead")
    assert statuses(hooks.store_path)[event_id] == ("dead", 4, "HTTP 502")  # 1 + 3 retries
    assert len(target.hits) == 4
    await eventually(lambda: hooks.stats.dead == 1, "counted")


async def test_retry_after_is_honoured(hooks: Hooks, servers: list[TestServer]) -> None:
    hooks.relay.config = RelayConfig(
        DEFAULT_ALLOWED_TARGETS, (600.0,), SigningKeys(SigningSecret(hooks.secret))
    )
    target = await start_target(servers)
    target.answer = lambda n: (
        web.Response(status=429, headers={"Retry-After": "1"}) if n == 1 else web.Response()
    )
    route = add_route(hooks.store_path, target.url)
    assert await post(hooks, route) == 200
    # Within the deadline: long before the 600 s slot the schedule alone would wait.
    await eventually(lambda: len(target.hits) == 2, "the retry", deadline_s=60)
    assert target.hits[1].at - target.hits[0].at >= 0.9  # not before Retry-After's second


async def test_an_attempt_without_an_answer_times_out_and_is_retried(
    tmp_path: Path, servers: list[TestServer]
) -> None:
    release = asyncio.Event()

    async def stall(n: int) -> web.Response:
        if n == 1:
            await release.wait()  # never answers the first attempt
        return web.Response()

    target = await start_target(servers, Target(answer=stall))
    path = tmp_path / "w.sqlite3"
    store = Store(path)
    event_id = store.receive(
        "dev", add_route(path, target.url), b"a", "text/plain", None, None, time.time()
    ).event_id
    store.close()
    db = await StoreThread.open(path)
    keys = SigningKeys(SigningSecret(new_secret()))
    stats = WebhookStats()
    relay = Relay(
        db, RelayConfig(DEFAULT_ALLOWED_TARGETS, (0.1,), keys), stats, poll_interval=0.1, timeout=0.5
    )
    await relay.start()
    try:
        await eventually(lambda: statuses(path)[event_id][:2] == ("delivered", 2), "delivered on the retry")
    finally:
        release.set()
        await relay.stop(timeout=1.0)
        await db.close()
    assert [h.headers["webhook-id"] for h in target.hits] == [event_id, event_id]
    assert stats.retried == 1


async def test_410_marks_the_route_gone(hooks: Hooks, servers: list[TestServer]) -> None:
    target = await start_target(servers)
    target.answer = lambda n: web.Response(status=410)
    route = add_route(hooks.store_path, target.url)
    assert await post(hooks, route) == 200
    await eventually(lambda: next(iter(statuses(hooks.store_path).values()))[0] == "gone", "gone")
    assert await post(hooks, route, BODY + b"\n") == 200  # still accepted from Skytells...
    # A later event to another app: once it is delivered, the relay has read the outbox
    # after the gone route's event was stored, and would have sent that one too.
    other = await start_target(servers)
    assert await post(hooks, add_route(hooks.store_path, other.url)) == 200
    await eventually(
        lambda: sorted(s for s, _, _ in statuses(hooks.store_path).values()) == ["delivered", "gone", "gone"],
        "the later event delivered",
    )
    assert len(target.hits) == 1  # ...but never sent again


async def test_a_slow_target_never_holds_up_another(hooks: Hooks, servers: list[TestServer]) -> None:
    release = asyncio.Event()

    async def stall(n: int) -> web.Response:
        await release.wait()
        return web.Response()

    slow = await start_target(servers)
    slow.answer = stall
    fast = await start_target(servers)
    slow_route = add_route(hooks.store_path, slow.url)
    fast_route = add_route(hooks.store_path, fast.url)
    for n in range(6):
        assert await post(hooks, slow_route, BODY + b" " * n) == 200
    await eventually(lambda: slow.active == 2, "the slow target's slots filled")
    assert await post(hooks, fast_route) == 200
    await eventually(lambda: len(fast.hits) == 1, "the fast target served meanwhile")
    assert slow.most_active == 2  # per-target concurrency is bounded
    release.set()
    await eventually(lambda: len(slow.hits) == 6, "the slow target caught up")


async def test_a_target_no_longer_allowed_is_never_contacted(hooks: Hooks, servers: list[TestServer]) -> None:
    target = await start_target(servers)
    hooks.relay.config = RelayConfig(
        (TargetPattern("https", "app.example.com", 443, ""),),
        (0.2,),
        SigningKeys(SigningSecret(hooks.secret)),
    )
    route = add_route(hooks.store_path, target.url)
    assert await post(hooks, route) == 200
    await eventually(lambda: next(iter(statuses(hooks.store_path).values()))[0] == "dead", "dead")
    assert next(iter(statuses(hooks.store_path).values()))[2] == "target not in allowed_targets"
    assert target.hits == []


async def test_pending_deliveries_resume_after_a_restart(tmp_path: Path, servers: list[TestServer]) -> None:
    target = Target()
    target.answer = lambda n: web.Response(status=503)
    await start_target(servers, target)
    path = tmp_path / "w.sqlite3"
    route = add_route(path, target.url)
    store = Store(path)
    ids = [
        store.receive("dev", route, b"%d" % n, "text/plain", None, None, time.time()).event_id
        for n in range(5)
    ]
    store.close()
    secret = SigningKeys(SigningSecret(new_secret()))
    for answer in (503, 200):
        target.answer = lambda n, answer=answer: web.Response(status=answer)  # type: ignore[misc]
        db = await StoreThread.open(path)
        # The first run's retries are an hour away, so all five stay pending however slow
        # the machine; the second run's clock is two hours on, so they are all due.
        later = 0.0 if answer == 503 else 7200.0
        relay = Relay(
            db,
            RelayConfig(DEFAULT_ALLOWED_TARGETS, (3600.0,), secret),
            WebhookStats(),
            poll_interval=0.1,
            clock=lambda later=later: time.time() + later,  # type: ignore[misc]
        )
        await relay.start()
        want = "delivered" if answer == 200 else "pending"
        await eventually(
            lambda want=want: all(statuses(path)[i][0] == want and statuses(path)[i][1] >= 1 for i in ids),  # type: ignore[misc]
            f"all {want}",
        )
        await relay.stop(timeout=1)
        await db.close()
    assert {h.headers["webhook-id"] for h in target.hits} == set(ids)


async def test_stop_waits_for_attempts_in_flight_then_leaves_the_rest_pending(
    tmp_path: Path, servers: list[TestServer]
) -> None:
    release = asyncio.Event()
    answer_quick = asyncio.Event()

    async def quick(n: int) -> web.Response:
        await answer_quick.wait()  # answers once the stop has begun
        return web.Response()

    async def stall(n: int) -> web.Response:
        await release.wait()
        return web.Response()

    first, second = Target(answer=quick), Target(answer=stall)
    await start_target(servers, first)
    await start_target(servers, second)
    path = tmp_path / "w.sqlite3"
    store = Store(path)
    one = store.receive(
        "dev", add_route(path, first.url), b"a", "text/plain", None, None, time.time()
    ).event_id
    two = store.receive(
        "dev", add_route(path, second.url), b"b", "text/plain", None, None, time.time()
    ).event_id
    store.close()
    db = await StoreThread.open(path)
    keys = SigningKeys(SigningSecret(new_secret()))
    relay = Relay(db, RelayConfig(DEFAULT_ALLOWED_TARGETS, (0.1,), keys), WebhookStats(), poll_interval=0.1)
    await relay.start()
    await eventually(lambda: first.hits and second.hits, "both attempts in flight")
    started = time.monotonic()
    stopping = asyncio.create_task(relay.stop(timeout=3.0))
    await asyncio.sleep(0)  # the stop task runs first: it stops taking work, then waits
    answer_quick.set()
    await stopping
    assert time.monotonic() - started < 30  # the stalled attempt was cut off, not waited for
    await db.close()
    release.set()
    found = statuses(path)
    assert found[one][:2] == ("delivered", 1)
    assert found[two][:2] == ("pending", 0)  # cut off: sent again, same webhook-id, after a restart
