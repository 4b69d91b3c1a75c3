"""Limits and the audit trail through the real proxy, in front of the real mock."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import stat
import time
import zlib
from pathlib import Path
from typing import Any

from aiohttp import web
from helpers import CANARY, env_config

CREATE = {"model": "truefusion-pro", "input": {"prompt": "a secret prompt about otters"}}
PRICING = '[pricing]\n"truefusion-pro" = 0.05\n'
EXAMPLE = Path(__file__).resolve().parents[2] / "skyproxy.toml.example"


async def audit_lines(path: Path, count: int, deadline_s: float = 10.0) -> list[dict[str, Any]]:
    """The audit lines once at least `count` are on disk (the writer is a thread)."""
    deadline = time.monotonic() + deadline_s
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        await asyncio.sleep(0.02)


def rules(per_user: str, per_environment: str | None = None, max_wait: float = 0) -> str:
    env_line = f'per_environment = "{per_environment}"\n' if per_environment else ""
    return (
        '[rate_limit]\nuser_header = "X-User-Id"\n'
        "[[rate_limit.rules]]\n"
        'name = "predictions"\nmethods = ["POST"]\npaths = ["/v1/predictions", "/v1/predict"]\n'
        f'per_user = "{per_user}"\n{env_line}max_wait = {max_wait}\n'
    )


async def post(proxy: Any, user: str | None = "alice", path: str = "/v1/predictions") -> Any:
    headers = {"X-User-Id": user} if user else {}
    async with proxy.session.post(f"{proxy.url}{path}", json=CREATE, headers=headers) as r:
        return r.status, dict(r.headers), await r.json()


# -- limits ----------------------------------------------------------------------------------


async def test_eleventh_request_in_a_minute_is_rejected_with_the_rules_numbers(
    mock_upstream, start_proxy, canary_env
):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, rules=rules("10/minute")))
    for i in range(10):
        status, headers, _ = await post(proxy)
        assert status == 201
        assert headers["RateLimit-Limit"] == "10"
        assert headers["RateLimit-Remaining"] == str(9 - i)
    status, headers, body = await post(proxy)
    assert status == 429
    assert body["error"]["code"] == "rate_limited"
    assert body["error"]["message"] == explained("Your generation limit (10/min) has been reached.", headers)
    retry = int(headers["Retry-After"])
    assert 1 <= retry <= 6  # one unit of a 10/minute bucket drains in 6 s
    assert body["error"]["retry_after"] == retry
    assert headers["RateLimit-Remaining"] == "0"
    assert int(headers["RateLimit-Reset"]) >= retry


def explained(reached: str, headers: dict[str, str]) -> str:
    """A 429's message: both waits, each named after the header that carries it."""
    return (
        f"{reached} The next request fits in {headers['Retry-After']} s (Retry-After); "
        f"all {headers['RateLimit-Limit']} are available again in {headers['RateLimit-Reset']} s "
        "(RateLimit-Reset)."
    )


async def test_the_example_config_shows_a_per_user_limit_before_the_environment_one(start_proxy):
    """The quick start's config: a demanding alice is stopped, and bob still gets through."""
    example = EXAMPLE.read_text()
    assert 'listen = ["127.0.0.1:8787"]' in example
    proxy = await start_proxy(example.replace('listen = ["127.0.0.1:8787"]', 'listen = ["127.0.0.1:0"]'))
    assert [(await post(proxy))[0] for _ in range(10)] == [201] * 10
    status, headers, body = await post(proxy)
    assert status == 429
    assert body["error"]["code"] == "rate_limited"  # alice's own limit, not the environment's
    assert body["error"]["message"] == explained("Your generation limit (10/min) has been reached.", headers)
    assert 1 <= int(headers["Retry-After"]) <= 6 < int(headers["RateLimit-Reset"]) <= 60
    status, headers, _ = await post(proxy, "bob")
    assert status == 201
    assert headers["RateLimit-Remaining"] == "9"


async def test_capacity_returns_after_the_period(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, rules=rules("2/second")))
    assert [(await post(proxy))[0] for _ in range(3)] == [201, 201, 429]
    await asyncio.sleep(1.05)  # a whole period: the leaky bucket has drained
    assert [(await post(proxy))[0] for _ in range(3)] == [201, 201, 429]


async def test_users_are_isolated(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, rules=rules("2/minute")))
    assert [(await post(proxy, "alice"))[0] for _ in range(3)] == [201, 201, 429]
    assert [(await post(proxy, "bob"))[0] for _ in range(2)] == [201, 201]


async def test_missing_user_rejected(mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url, rules=rules("5/minute")))
    seen_before = len(state.seen)
    status, _, body = await post(proxy, user=None)
    assert status == 400
    assert body["error"]["code"] == "missing_user"
    assert len(state.seen) == seen_before  # never reached the upstream


async def test_missing_user_shared_bucket(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    shared = rules("2/minute").replace(
        'user_header = "X-User-Id"\n', 'user_header = "X-User-Id"\nmissing_user = "shared"\n'
    )
    proxy = await start_proxy(env_config(url, rules=shared))
    assert [(await post(proxy, user=None))[0] for _ in range(3)] == [201, 201, 429]
    assert (await post(proxy, user="carol"))[0] == 201  # a named user has its own bucket
    lines = await audit_lines(proxy.audit_path, 4)
    assert [line["userId"] for line in lines[:3]] == ["anonymous"] * 3


async def test_unmatched_routes_are_not_limited(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, rules=rules("1/minute")))
    status, _, created = await post(proxy)
    assert status == 201
    for _ in range(5):
        async with proxy.session.get(f"{proxy.url}/v1/predictions/{created['id']}") as r:
            assert r.status == 200
            assert "RateLimit-Limit" not in r.headers


async def test_environment_limit_smooths_with_max_wait(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, rules=rules("100/second", "2/second", max_wait=2)))
    # Four users at once against an environment quota of 2/second: all get through,
    # the last ones after waiting for the account's pace.
    results = await asyncio.gather(*(post(proxy, f"user{i}") for i in range(4)))
    assert [r[0] for r in results] == [201] * 4


async def test_environment_limit_rejects_beyond_max_wait(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, rules=rules("100/minute", "2/minute", max_wait=0)))
    results = [await post(proxy, f"user{i}") for i in range(3)]
    assert [r[0] for r in results] == [201, 201, 429]
    body = results[2][2]
    assert body["error"]["code"] == "environment_rate_limited"
    assert int(results[2][1]["Retry-After"]) >= 1


async def test_upstream_429_passes_through_and_is_counted(raw_upstream, start_proxy, canary_env):
    async def limited(request: web.Request) -> web.Response:
        envelope = {"status": False, "error": {"http_status": 429, "error_id": "RATE_LIMIT_EXCEEDED"}}
        return web.json_response(envelope, status=429, headers={"Retry-After": "17"})

    app = web.Application()
    app.router.add_post("/v1/predictions", limited)
    url = await raw_upstream(app)
    proxy = await start_proxy(env_config(url, rules=rules("100/minute")))
    status, headers, body = await post(proxy)
    assert status == 429
    assert headers["Retry-After"] == "17"
    assert body["error"]["error_id"] == "RATE_LIMIT_EXCEEDED"
    async with proxy.session.get(f"{proxy.url}/-/metrics") as r:
        text = await r.text()
    assert 'skyproxy_upstream_rate_limited_total{environment="dev"} 1.0' in text


# -- audit -----------------------------------------------------------------------------------


async def test_created_then_one_terminal_line_per_prediction(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, extra=PRICING))
    status, _, created = await post(proxy)
    assert status == 201
    prediction_id = created["id"]
    statuses = []
    for _ in range(200):
        async with proxy.session.get(f"{proxy.url}/v1/predictions/{prediction_id}") as r:
            statuses.append((await r.json())["status"])
        if statuses[-1] == "succeeded":
            break
        await asyncio.sleep(0.02)
    for _ in range(3):  # polls after the end must not add lines
        async with proxy.session.get(f"{proxy.url}/v1/predictions/{prediction_id}") as r:
            assert r.status == 200
    assert statuses[-1] == "succeeded" and "processing" in statuses
    lines = await audit_lines(proxy.audit_path, 2)
    await asyncio.sleep(0.2)
    lines = await audit_lines(proxy.audit_path, 2)
    assert [line["status"] for line in lines] == ["created", "succeeded"]
    first, last = lines
    assert list(first) == [
        "timestamp", "event", "environment", "userId", "predictionId", "model", "status",
        "httpStatus", "latencyMs", "costUsd", "ipAddress", "requestId", "keyFingerprint",
        "method", "path", "client",
    ]  # fmt: skip
    assert first["client"] is None  # no client token presented
    assert first["event"] == "prediction" and first["environment"] == "dev"
    assert first["predictionId"] == last["predictionId"] == prediction_id
    assert first["userId"] == last["userId"] == "alice"
    assert first["model"] == last["model"] == "truefusion-pro"
    assert first["httpStatus"] == 201 and last["httpStatus"] == 200
    assert first["costUsd"] == 0.05  # the [pricing] estimate
    assert last["costUsd"] == 0.03  # the upstream's metadata.billing.credits_used
    assert first["keyFingerprint"].endswith(CANARY[-4:]) and CANARY not in json.dumps(lines)
    assert first["ipAddress"] == "127.0.0.1" and first["method"] == "POST"
    assert last["path"] == f"/v1/predictions/{prediction_id}"
    assert first["timestamp"].endswith("Z") and len(first["timestamp"]) == 24
    assert "otters" not in proxy.audit_path.read_text()  # never the prompt


async def test_cancel_is_logged_once_as_canceled(mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    state.delay = 60
    proxy = await start_proxy(env_config(url, extra=PRICING))
    _, _, created = await post(proxy)
    for _ in range(2):
        async with proxy.session.post(f"{proxy.url}/v1/predictions/{created['id']}/cancel") as r:
            assert (await r.json())["status"] == "cancelled"  # the mock's spelling
    async with proxy.session.get(f"{proxy.url}/v1/predictions/{created['id']}") as r:
        assert r.status == 200
    await asyncio.sleep(0.2)
    lines = await audit_lines(proxy.audit_path, 2)
    assert [line["status"] for line in lines] == ["created", "canceled"]
    assert lines[1]["costUsd"] == 0.0  # the upstream reported credits_used 0: that wins


async def test_failed_creates_and_rejections(mock_upstream, start_proxy, canary_env, tmp_path):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, rules=rules("1/minute"), extra=PRICING))
    async with proxy.session.post(
        f"{proxy.url}/v1/predictions", json={"input": {}}, headers={"X-User-Id": "dave"}
    ) as r:
        assert r.status == 422  # the mock refuses a body without a model
    status, _, _ = await post(proxy, "dave")
    assert status == 429
    lines = await audit_lines(proxy.audit_path, 2)
    assert [(x["status"], x["httpStatus"]) for x in lines] == [("failed", 422), ("rejected", 429)]
    assert lines[0]["predictionId"] is None and lines[0]["costUsd"] is None
    assert lines[1]["latencyMs"] is None


async def test_unreachable_create_is_failed(start_proxy, canary_env):
    from helpers import free_port

    proxy = await start_proxy(env_config(f"http://127.0.0.1:{free_port()}"))
    status, _, body = await post(proxy)
    assert status == 502 and body["error"]["code"] == "upstream_unreachable"
    lines = await audit_lines(proxy.audit_path, 1)
    assert [(x["status"], x["httpStatus"]) for x in lines] == [("failed", 502)]


async def test_create_over_the_body_limit_while_streaming_is_failed(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, server="max_body_bytes = 70000"))

    async def body():  # type: ignore[no-untyped-def]
        for _ in range(10):  # chunked, with no length to refuse it by: counted as it streams
            yield b'{"model": "truefusion-pro", "pad": "' + b"x" * 10_000

    async with proxy.session.post(
        f"{proxy.url}/v1/predictions", data=body(), headers={"X-User-Id": "alice"}
    ) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "body_too_large"
    lines = await audit_lines(proxy.audit_path, 1)
    assert [(x["status"], x["httpStatus"], x["userId"]) for x in lines] == [("failed", 413, "alice")]


async def test_terminal_failed_and_estimate_fallback(raw_upstream, start_proxy, canary_env):
    async def create(request: web.Request) -> web.Response:
        return web.json_response({"id": "p-1", "status": "starting", "model": "truefusion-pro"}, status=201)

    async def get(request: web.Request) -> web.Response:
        return web.json_response({"id": "p-1", "status": "failed", "model": {"name": "truefusion-pro"}})

    app = web.Application()
    app.router.add_post("/v1/predictions", create)
    app.router.add_get("/v1/predictions/{id}", get)
    proxy = await start_proxy(env_config(await raw_upstream(app), extra=PRICING))
    await post(proxy)
    for _ in range(2):
        async with proxy.session.get(f"{proxy.url}/v1/predictions/p-1") as r:
            assert r.status == 200
    await asyncio.sleep(0.2)
    lines = await audit_lines(proxy.audit_path, 2)
    assert [(x["status"], x["costUsd"]) for x in lines] == [("created", 0.05), ("failed", 0.05)]


async def test_coded_answers_are_audited_whatever_the_case_of_the_coding(
    raw_upstream, start_proxy, canary_env
):
    # The audit undoes the same codings as the relay, with names compared case-insensitively.
    def coded(value: dict[str, Any], coding: str, status: int = 200) -> web.Response:
        body = json.dumps(value).encode()
        body = zlib.compress(body) if coding.lower() == "deflate" else gzip.compress(body)
        headers = {"Content-Encoding": coding, "Content-Type": "application/json"}
        return web.Response(status=status, body=body, headers=headers)

    async def create(request: web.Request) -> web.Response:
        return coded({"id": "p-z", "status": "starting", "model": "truefusion-pro"}, "GZIP", 201)

    async def get(request: web.Request) -> web.Response:
        return coded({"id": "p-z", "status": "succeeded", "model": "truefusion-pro"}, "X-Gzip")

    async def cancel(request: web.Request) -> web.Response:
        return coded({"id": "p-d", "status": "cancelled"}, "Deflate")

    app = web.Application()
    app.router.add_post("/v1/predictions", create)
    app.router.add_get("/v1/predictions/{id}", get)
    app.router.add_post("/v1/predictions/{id}/cancel", cancel)
    proxy = await start_proxy(env_config(await raw_upstream(app), extra=PRICING))
    headers = {"X-User-Id": "alice"}
    async with proxy.session.post(f"{proxy.url}/v1/predictions", json=CREATE, headers=headers) as r:
        assert r.status == 201
    async with proxy.session.get(f"{proxy.url}/v1/predictions/p-z") as r:
        assert r.status == 200
    async with proxy.session.post(f"{proxy.url}/v1/predictions/p-d/cancel") as r:
        assert r.status == 200
    lines = await audit_lines(proxy.audit_path, 3)
    assert [(x["predictionId"], x["status"]) for x in lines] == [
        ("p-z", "created"),
        ("p-z", "succeeded"),
        ("p-d", "canceled"),
    ]


async def test_streamed_create_is_audited_at_the_end_of_the_stream(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    body = {"model": "lumo", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with proxy.session.post(
        f"{proxy.url}/v1/chat/completions", json=body, headers={"X-User-Id": "erin"}
    ) as r:
        text = (await r.read()).decode()
    assert text.rstrip().endswith("data: [DONE]")
    lines = await audit_lines(proxy.audit_path, 1)
    assert lines[0]["status"] == "created" and lines[0]["model"] == "lumo"
    assert lines[0]["predictionId"].startswith("chatcmpl-")
    # The mock sleeps 0.02 s between six events: the latency covers the whole stream.
    assert lines[0]["latencyMs"] >= 100


async def test_audit_files_are_private(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    await post(proxy)
    await audit_lines(proxy.audit_path, 1)
    assert stat.S_IMODE(os.stat(proxy.audit_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(proxy.audit_path.parent).st_mode) == 0o700


async def test_on_failure_reject_pauses_predictions_until_writes_succeed(
    mock_upstream, start_proxy, canary_env, tmp_path
):
    url, _ = mock_upstream
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the audit folder should be")
    config = env_config(url).replace('path = "audit/audit.jsonl"', 'path = "blocked/audit.jsonl"')
    proxy = await start_proxy(config.replace("[audit]\n", '[audit]\non_failure = "reject"\n'))
    for _ in range(300):  # the writer finds out when it first opens the file
        if proxy.state.audit.reject_new:
            break
        await asyncio.sleep(0.02)
    status, _, body = await post(proxy)
    assert status == 503 and body["error"]["code"] == "audit_unavailable"
    blocker.unlink()  # the disk is repaired
    for _ in range(300):
        if not proxy.state.audit.reject_new:
            break
        await asyncio.sleep(0.02)
    assert (await post(proxy))[0] == 201
    lines = await audit_lines(tmp_path / "blocked/audit.jsonl", 1)
    assert [x["status"] for x in lines] == ["created"]
    async with proxy.session.get(f"{proxy.url}/-/metrics") as r:
        text = await r.text()
    assert "skyproxy_audit_write_failures " in text
    assert "skyproxy_audit_write_failures 0.0" not in text


async def test_metrics_exposes_the_counters(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, rules=rules("1/minute")))
    await post(proxy)
    await post(proxy)
    async with proxy.session.get(f"{proxy.url}/-/metrics") as r:
        assert r.status == 200
        text = await r.text()
    assert 'skyproxy_requests_total{environment="dev",route="/v1/predictions",status="201"} 1.0' in text
    assert 'skyproxy_requests_total{environment="dev",route="/v1/predictions",status="429"} 1.0' in text
    assert 'skyproxy_rate_limit_rejections_total{rule="predictions",scope="user"} 1.0' in text
    assert 'skyproxy_predictions_total{environment="dev",status="created"} 1.0' in text
    assert 'skyproxy_predictions_total{environment="dev",status="rejected"} 1.0' in text
    assert "skyproxy_upstream_latency_seconds_bucket" in text
    assert "skyproxy_audit_queue_depth" in text
    assert "skyproxy_upstream_unauthorized_total" in text or "skyproxy_upstream_unauthorized" in text
