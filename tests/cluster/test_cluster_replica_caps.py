"""Budgets and in-flight caps through three replicas of `skyproxy serve` on one redis-server.

The requests go round-robin to replicas on their own ports; the Redis URL carries a
canary password that must show nowhere: not in answers, logs or audit files.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from helpers import Daemon
from helpers.access import Recorder
from helpers.daemon import CREATE, eventually
from helpers.redis_server import RedisServer

Replicas = Callable[..., list[Daemon]]
PASSWORD = "pw-canary-4e8a1c6b2d9f0e3a7c5b"
BUDGET = (
    "[rate_limit]\nenabled = false\n"
    "[pricing]\ntruefusion-pro = 0.3\n"
    '[[budgets]]\nname = "daily"\nper = "user"\nusd = 1.0\nperiod = "day"\n'
)
CAPPED = (
    '[rate_limit]\nuser_header = "X-User-Id"\n'
    '[[rate_limit.rules]]\nname = "predictions"\nmethods = ["POST"]\npaths = ["/v1/predictions"]\n'
    "max_in_flight = 2\n"
)


async def post(session: aiohttp.ClientSession, daemon: Daemon, user: str = "alice") -> tuple[int, Any, Any]:
    async with session.post(f"{daemon.url}/v1/predictions", json=CREATE, headers={"X-User-Id": user}) as r:
        return r.status, dict(r.headers), await r.json(content_type=None)


def assert_password_hidden(replicas: list[Daemon], captured: list[str]) -> None:
    texts = list(captured)
    for daemon in replicas:
        texts.append(daemon.stderr())
        texts += [p.read_text(errors="replace") for p in daemon.config.parent.rglob("*.jsonl")]
    for text in texts:
        assert PASSWORD not in text
        assert PASSWORD[-12:] not in text


async def test_a_1_dollar_budget_admits_exactly_3_of_20_creates_at_030_across_replicas(
    start_redis: Callable[..., RedisServer], start_replicas: Replicas, raw_upstream: Callable[..., Any]
) -> None:
    server = start_redis(password=PASSWORD)
    upstream = Recorder(hold=asyncio.Event())
    url = await raw_upstream(upstream.app())
    replicas = start_replicas(server.url, rules=BUDGET, upstream=url)
    captured: list[str] = []
    async with aiohttp.ClientSession() as session:
        creates = [asyncio.create_task(post(session, replicas[i % 3])) for i in range(20)]
        # The three admitted wait at the upstream, holding their reservations, while the
        # other seventeen are refused.
        await eventually(
            lambda: upstream.creates == 3 and sum(t.done() for t in creates) == 17, "3 held, 17 refused"
        )
        refused = [t.result() for t in creates if t.done()]
        assert upstream.hold is not None
        upstream.hold.set()
        answers = await asyncio.gather(*creates)
        captured += [repr(answer) for answer in answers]
        assert Counter(status for status, _, _ in answers) == {201: 3, 402: 17}
        for status, headers, body in refused:
            assert status == 402
            error = body["error"]
            assert error["code"] == "budget_exceeded"
            assert (error["spent_usd"], error["reserved_usd"], error["limit_usd"]) == (0.0, 0.9, 1.0)
            assert 1 <= int(headers["Retry-After"]) <= 86_400
        # Every replica refused some: the budget was not multiplied by three.
        assert {i % 3 for i, (status, _, _) in enumerate(answers) if status == 402} == {0, 1, 2}

        # Once recorded, the three are spend, shared: every replica refuses the next create
        # with $0.90 spent and nothing reserved.
        async def all_see_the_spend() -> bool:
            seen = [await post(session, daemon) for daemon in replicas]
            captured.extend(repr(answer) for answer in seen)
            return all(
                status == 402 and (body["error"]["spent_usd"], body["error"]["reserved_usd"]) == (0.9, 0.0)
                for status, _, body in seen
            )

        await eventually(all_see_the_spend, "the spend of the three seen by every replica")
        assert upstream.creates == 3
        # Each replica's /-/budgets shows every replica's figures, not its own lines alone.
        for daemon in replicas:
            async with session.get(f"{daemon.url}/-/budgets") as answer:
                text = await answer.text()
                captured.append(text)
                report = await answer.json()
            assert report["source"] == f"Redis redis://127.0.0.1:{server.port}/0 (every replica)"
            assert [(r["subject"], r["spent_usd"], r["reserved_usd"]) for r in report["budgets"]] == [
                ("alice", 0.9, 0.0)
            ]
            async with session.get(f"{daemon.url}/-/api/spend") as answer:  # the dashboard's bars
                captured.append(await answer.text())
                bars = (await answer.json())["budgets"]
            assert [(r["subject"], r["spent_usd"], r["used_fraction"]) for r in bars] == [("alice", 0.9, 0.9)]
        # Another user's budget is their own.
        assert (await post(session, replicas[1], "bob"))[0] == 201
    assert_password_hidden(replicas, captured)


async def test_a_cap_of_2_holds_across_replicas_and_a_killed_holder_frees_it_at_lease_expiry(
    start_redis: Callable[..., RedisServer], start_replicas: Replicas, raw_upstream: Callable[..., Any]
) -> None:
    server = start_redis(password=PASSWORD)
    upstream = Recorder(hold=asyncio.Event())
    url = await raw_upstream(upstream.app())
    replicas = start_replicas(server.url, rules=CAPPED, upstream=url)
    doomed = replicas[0]
    captured: list[str] = []
    async with aiohttp.ClientSession() as session:
        held = [asyncio.create_task(post(session, doomed)) for _ in range(2)]
        await eventually(lambda: upstream.creates == 2, "two creates held at the upstream")
        over = await asyncio.gather(*(post(session, replicas[i % 3]) for i in range(6)))
        captured += [repr(answer) for answer in over]
        for status, headers, body in over:
            assert (status, body["error"]["code"], headers["Retry-After"]) == (429, "too_many_in_flight", "1")
        # Another user's cap is their own: bob reaches the upstream.
        bob = asyncio.create_task(post(session, replicas[2], "bob"))
        await eventually(lambda: upstream.creates == 3, "bob's create held at the upstream")

        # The holder dies without releasing: its slots stay taken until their lease runs out.
        doomed.signal(signal.SIGKILL)
        doomed.wait(10)
        await asyncio.gather(*held, return_exceptions=True)
        right_after = await asyncio.gather(*(post(session, daemon) for daemon in replicas[1:]))
        assert [status for status, _, _ in right_after] == [429, 429]
        assert upstream.hold is not None
        upstream.hold.set()
        assert (await bob)[0] == 201

        async def admitted() -> bool:
            status, _, body = await post(session, replicas[1])
            captured.append(repr(body))
            return status == 201

        await eventually(admitted, "a slot freed once the dead replica's lease ran out")
    assert_password_hidden(replicas, captured)


def billed_upstream(final_usd: float) -> web.Application:
    """Creates answered like Skytells; a poll finds the prediction succeeded, billed `final_usd`."""
    created: list[str] = []

    async def create(request: web.Request) -> web.Response:
        created.append(f"pred_{len(created) + 1:04d}")
        return web.json_response(
            {"id": created[-1], "status": "starting", "model": "truefusion-pro"}, status=201
        )

    async def poll(request: web.Request) -> web.Response:
        body = {
            "id": request.match_info["id"],
            "status": "succeeded",
            "model": "truefusion-pro",
            "metadata": {"billing": {"credits_used": final_usd}},
        }
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/v1/predictions", create)
    app.router.add_get("/v1/predictions/{id}", poll)
    return app


async def test_a_final_cost_seen_through_another_replica_replaces_the_estimate(
    start_redis: Callable[..., RedisServer], start_replicas: Replicas, raw_upstream: Callable[..., Any]
) -> None:
    server = start_redis(password=PASSWORD)
    url = await raw_upstream(billed_upstream(0.10))
    replicas = start_replicas(server.url, rules=BUDGET.replace("usd = 1.0", "usd = 0.35"), upstream=url)
    captured: list[str] = []
    async with aiohttp.ClientSession() as session:
        status, _, body = await post(session, replicas[0])
        assert status == 201
        # Polled through another replica, which writes the terminal line: $0.10 in place
        # of the $0.30 estimate, not on top of it, and billed to alice though the poll
        # names no user, as one replica would bill her.
        async with session.get(f"{replicas[1].url}/v1/predictions/{body['id']}") as r:
            assert r.status == 200

        async def spent_is_the_final_cost() -> bool:
            status, _, body = await post(session, replicas[2])
            captured.append(repr(body))
            return status == 402 and body["error"]["spent_usd"] == 0.1

        await eventually(spent_is_the_final_cost, "$0.10 spent: $0.30 more would pass $0.35")
    assert_password_hidden(replicas, captured)
