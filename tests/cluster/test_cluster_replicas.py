"""Three replicas of `skyproxy serve` on their own ports against one real redis-server."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import Daemon, env_config
from helpers.daemon import CREATE, eventually
from helpers.redis_server import RedisServer

Replicas = Callable[..., list[Daemon]]
RULES = (
    '[rate_limit]\nuser_header = "X-User-Id"\n'
    '[[rate_limit.rules]]\nname = "predictions"\nmethods = ["POST"]\npaths = ["/v1/predictions"]\n'
    'per_user = "{per_user}"\n'
)


async def post(session: aiohttp.ClientSession, daemon: Daemon, user: str) -> tuple[int, dict[str, str], Any]:
    async with session.post(f"{daemon.url}/v1/predictions", json=CREATE, headers={"X-User-Id": user}) as r:
        return r.status, dict(r.headers), await r.json(content_type=None)


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as r:
        return r.status, await r.json(content_type=None)


async def cluster_errors(session: aiohttp.ClientSession, daemon: Daemon) -> float:
    async with session.get(f"{daemon.url}/-/metrics") as r:
        text = await r.text()
    found = re.search(r"^skyproxy_cluster_errors_total (\S+)$", text, re.M)
    assert found, text
    return float(found.group(1))


async def test_a_per_user_limit_of_10_a_minute_admits_10_of_30_across_replicas(
    redis_server: RedisServer, start_replicas: Replicas
) -> None:
    replicas = start_replicas(redis_server.url, rules=RULES.format(per_user="10/minute"))
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(post(session, replicas[i % 3], "alice") for i in range(30)))
        # Exactly 10 in all, not 10 per replica. (Which replica's requests come first is up to
        # the scheduler: one replica may see only admissions.)
        statuses = Counter(status for status, _, _ in answers)
        assert statuses == {201: 10, 429: 20}
        for status, headers, body in answers:
            if status == 201:
                assert headers["RateLimit-Limit"] == "10"
                continue
            assert body["error"]["code"] == "rate_limited"
            retry = int(headers["Retry-After"])
            # One unit of 10/minute drains in 6 s: the wait is the level's excess over 9,
            # exactly what Reset (the time to drain all 10) says less 54 s.
            assert 1 <= retry <= 6
            assert retry == int(headers["RateLimit-Reset"]) - 54
            assert body["error"]["retry_after"] == retry
        # Retry-After is honest: after waiting it, exactly one more request fits.
        wait = max(int(headers["Retry-After"]) for status, headers, _ in answers if status == 429)
        await asyncio.sleep(wait)  # the wait is what is under test
        after = [await post(session, replicas[i], "alice") for i in range(3)]
        assert [status for status, _, _ in after] == [201, 429, 429]


@pytest.mark.parametrize("on_error", ["closed", "open"])
async def test_redis_stopped_and_restarted_under_load(
    redis_server: RedisServer, start_replicas: Replicas, on_error: str
) -> None:
    replicas = start_replicas(
        redis_server.url, on_error=on_error, rules=RULES.format(per_user="100000/minute")
    )
    seen: list[tuple[int, int, str, bool]] = []  # replica, status, code, checked (has RateLimit headers)
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession, worker: int) -> None:
        i = worker
        while not stop.is_set():
            status, headers, body = await post(session, replicas[i % 3], f"user-{i % 7}")
            code = body["error"]["code"] if status >= 400 else ""
            seen.append((i % 3, status, code, "RateLimit-Limit" in headers))
            i += 1

    def count(status: int) -> int:
        return sum(1 for _, s, _, _ in seen if s == status)

    async with aiohttp.ClientSession() as session:
        clients = [asyncio.create_task(client(session, w)) for w in range(3)]
        await eventually(lambda: count(201) >= 30, "traffic before the outage")
        redis_server.stop()
        if on_error == "closed":
            await eventually(lambda: count(503) >= 30, "503s while Redis is down")
        else:
            await eventually(lambda: sum(1 for *_, checked in seen if not checked) >= 30, "unchecked")
        expected = (503 if on_error == "closed" else 200, "degraded")
        for daemon in replicas:
            # Each replica turns degraded on its own first failed call, which on a busy
            # machine may come after the others' first 30 refusals.
            async def degraded(daemon: Daemon = daemon) -> bool:
                health, body = await get_json(session, f"{daemon.url}/-/health")
                return (health, body["status"]) == expected

            await eventually(degraded, "every replica degraded")
            _, status = await get_json(session, f"{daemon.url}/-/status")
            assert status["cluster"]["degraded"] is True
            assert status["cluster"]["on_error"] == on_error
        redis_server.start()
        started = time.monotonic()
        for daemon in replicas:

            async def healthy(daemon: Daemon = daemon) -> bool:
                return (await get_json(session, f"{daemon.url}/-/health")) == (200, {"status": "ok"})

            await eventually(healthy, "recovered within 5 s", deadline_s=5)
        assert time.monotonic() - started < 5
        mark = len(seen)
        await eventually(lambda: sum(1 for *_, checked in seen[mark:] if checked) >= 30, "checked again")
        stop.set()
        await asyncio.gather(*clients)
        for index, daemon in enumerate(replicas):
            mine = [entry for entry in seen if entry[0] == index]
            if on_error == "closed":
                refused = [e for e in mine if e[1] == 503]
                assert {code for _, _, code, _ in refused} == {"limits_unavailable"}
                assert await cluster_errors(session, daemon) == len(refused)
            else:
                assert {status for _, status, _, _ in mine} == {201}
                unchecked = [e for e in mine if not e[3]]
                assert await cluster_errors(session, daemon) == len(unchecked)
    for daemon in replicas:
        stderr = daemon.stderr()
        assert stderr.count("is unavailable") == 1, stderr
        assert stderr.count("is back after") == 1, stderr
        assert f"on_error={on_error}" in stderr


async def test_a_canary_password_in_the_redis_url_is_never_shown(
    start_redis: Callable[..., RedisServer], start_replicas: Replicas
) -> None:
    password = "pw-canary-9c1f3e7a5b2d4c6e8f0a"
    server = start_redis(password=password)
    replicas = start_replicas(server.url, rules=RULES.format(per_user="5/minute"))
    captured: list[str] = []
    async with aiohttp.ClientSession() as session:
        for i in range(8):
            _, headers, body = await post(session, replicas[i % 3], "alice")
            captured += [repr(headers), repr(body)]
        server.stop()
        for daemon in replicas:
            captured.append(repr(await post(session, daemon, "alice")))
            for path in ("/-/status", "/-/health", "/-/metrics"):
                async with session.get(f"{daemon.url}{path}") as r:
                    captured.append(await r.text())
        server.start()
        for daemon in replicas:

            async def healthy(daemon: Daemon = daemon) -> bool:
                return (await get_json(session, f"{daemon.url}/-/health"))[0] == 200

            await eventually(healthy, "recovered", deadline_s=5)
    for daemon in replicas:
        stderr = daemon.stderr()
        assert f"redis://127.0.0.1:{server.port}/0" in stderr
        captured.append(stderr)
        captured += [p.read_text() for p in daemon.config.parent.rglob("*.jsonl")]
    for text in captured:
        assert password not in text
        assert password[-12:] not in text


async def test_one_replica_behaves_the_same_with_and_without_cluster(
    redis_server: RedisServer, start_proxy: Any, tmp_path: Path
) -> None:
    rules = (
        '[rate_limit]\nuser_header = "X-User-Id"\n'
        '[[rate_limit.rules]]\nname = "predictions"\nmethods = ["POST"]\npaths = ["/v1/predictions"]\n'
        'per_user = "3/hour"\nper_environment = "5/hour"\n'
    )
    cluster = f'[cluster]\nredis = "{redis_server.url}"\non_error = "closed"\n'
    runs = []
    for extra in ("", cluster):
        proxy = await start_proxy(env_config("mock", key="", rules=rules, extra=extra))
        answers = []
        for user in ["alice"] * 4 + ["bob"] * 3 + ["carol"]:
            async with proxy.session.post(
                f"{proxy.url}/v1/predictions", json=CREATE, headers={"X-User-Id": user}
            ) as r:
                body = await r.json(content_type=None)
                shown = {k: v for k, v in r.headers.items() if k.startswith(("RateLimit-", "Retry-After"))}
                answers.append((r.status, (body.get("error") or {}).get("code"), shown))
        runs.append(answers)
        await proxy.server.stop()
    assert runs[0] == runs[1]
    assert [status for status, _, _ in runs[0]] == [201, 201, 201, 429, 201, 201, 429, 429]
