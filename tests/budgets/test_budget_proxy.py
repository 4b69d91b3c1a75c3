"""Budgets through a real proxy: 402 shape and headers, exact limits under 20 parallel
creates, every create path counted, no budget no refusal, spend kept over a SIGKILL."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from helpers import VENV_BIN, env_config, free_port, write_config
from helpers.access import Recorder
from helpers.daemon import CREATE, audit_lines, eventually
from helpers.http import assert_error, fetch, host_of, http_head, read_response
from yarl import URL

from skyproxy.webhooks.signing import new_secret

NO_LIMITS = "[rate_limit]\nenabled = false\n"
PRICED = "[pricing]\ntruefusion-pro = 0.1\n"


def budget(usd: float, per: str = "user", period: str = "day", extra: str = "") -> str:
    return f'[[budgets]]\nname = "cap"\nper = "{per}"\nusd = {usd}\nperiod = "{period}"\n{extra}\n'


async def post(
    proxy: Any, path: str = "/v1/predictions", user: str = "alice", body: Any = None
) -> tuple[int, Any, bytes]:
    return await fetch(
        proxy.session,
        "POST",
        f"{proxy.url}{path}",
        json=CREATE if body is None else body,
        headers={"X-User-Id": user},
    )


async def test_a_create_over_the_budget_gets_402_and_a_rejected_line(
    canary_env: str, start_proxy: Callable[..., Any], raw_upstream: Callable[..., Any]
) -> None:
    upstream = Recorder()
    url = await raw_upstream(upstream.app())
    proxy = await start_proxy(env_config(url, rules=NO_LIMITS, extra=PRICED + budget(0.25)))
    assert (await post(proxy))[0] == 201
    assert (await post(proxy))[0] == 201
    status, headers, body = await post(proxy)
    request_id = assert_error(402, "budget_exceeded", (status, headers, body))
    error = json.loads(body)["error"]
    assert error["budget"] == "cap" and error["limit_usd"] == 0.25 and error["spent_usd"] == 0.2
    assert error["resets_at"].endswith("T00:00:00Z")
    retry_after = int(headers["Retry-After"])
    assert 1 <= retry_after <= 86_400
    assert upstream.creates == 2  # the third never reached the upstream
    await eventually(lambda: len(audit_lines(proxy.audit_path)) == 3, "three audit lines")
    rejected = audit_lines(proxy.audit_path)[2]
    assert (rejected["status"], rejected["httpStatus"], rejected["requestId"]) == (
        "rejected",
        402,
        request_id,
    )
    assert (await post(proxy, user="bob"))[0] == 201  # per user


async def test_twenty_parallel_creates_hit_the_limit_exactly(
    canary_env: str, start_proxy: Callable[..., Any], raw_upstream: Callable[..., Any]
) -> None:
    upstream = Recorder(hold=asyncio.Event())
    url = await raw_upstream(upstream.app())
    proxy = await start_proxy(env_config(url, rules=NO_LIMITS, extra=PRICED + budget(1.0)))
    creates = [asyncio.create_task(post(proxy)) for _ in range(20)]
    await eventually(lambda: upstream.creates == 10, "ten creates held by the upstream")
    await eventually(lambda: sum(t.done() for t in creates) == 10, "the other ten refused meanwhile")
    assert upstream.creates == 10
    assert upstream.hold is not None
    upstream.hold.set()
    statuses = sorted(s for s, _, _ in await asyncio.gather(*creates))
    assert statuses == [201] * 10 + [402] * 10
    shown = (await fetch(proxy.session, "GET", f"{proxy.url}/-/budgets"))[2]
    (row,) = json.loads(shown)["budgets"]
    assert (row["spent_usd"], row["reserved_usd"], row["limit_usd"]) == (1.0, 0.0, 1.0)


async def test_every_create_path_is_counted(
    canary_env: str, start_proxy: Callable[..., Any], raw_upstream: Callable[..., Any]
) -> None:
    upstream = Recorder()
    url = await raw_upstream(upstream.app())
    priced = "[pricing]\ntruefusion-pro = 0.1\ngpt-x = 0.1\n"
    proxy = await start_proxy(env_config(url, rules=NO_LIMITS, extra=priced + budget(0.3)))
    assert (await post(proxy, "/v1/predict"))[0] == 201
    assert (await post(proxy, "/v1/chat/completions", body={"model": "gpt-x", "messages": []}))[0] == 201
    assert (await post(proxy, "/v1/embeddings", body={"model": "gpt-x", "input": "a"}))[0] == 201
    for path in ("/v1/predictions", "/v1/predict", "/v1/chat/completions", "/v1/responses", "/v1/embeddings"):
        assert_error(402, "budget_exceeded", await post(proxy, path, body={"model": "gpt-x"}))
    assert upstream.creates == 3
    # a poll or a list is not a create: never refused on budget grounds
    assert (await fetch(proxy.session, "GET", f"{proxy.url}/v1/predictions", headers={"X-User-Id": "alice"}))[
        0
    ] == 200


async def test_an_unpriced_model_passes_until_its_cost_is_known(
    canary_env: str, start_proxy: Callable[..., Any], mock_upstream: tuple[str, Any]
) -> None:
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, rules=NO_LIMITS, extra=budget(0.0)))
    assert (await post(proxy))[0] == 201  # estimated at 0: 0 + 0 is not over 0
    assert (await post(proxy))[0] == 201


async def test_no_budget_means_no_refusal(
    canary_env: str, start_proxy: Callable[..., Any], raw_upstream: Callable[..., Any]
) -> None:
    upstream = Recorder()
    url = await raw_upstream(upstream.app())
    proxy = await start_proxy(env_config(url, rules=NO_LIMITS, extra="[pricing]\ntruefusion-pro = 1000000\n"))
    statuses = [(await post(proxy))[0] for _ in range(30)]
    assert statuses == [201] * 30
    shown = json.loads((await fetch(proxy.session, "GET", f"{proxy.url}/-/budgets"))[2])
    assert shown["budgets"] == []


def test_spend_survives_restart_and_sigkill(tmp_path: Path, run_daemon: Callable[..., Any]) -> None:
    port = free_port()
    body = env_config(
        "mock", key="", listen=f"127.0.0.1:{port}", rules=NO_LIMITS, extra=PRICED + budget(0.35)
    )
    path = write_config(tmp_path, body)
    skyproxy = str(VENV_BIN / "skyproxy")

    def create(daemon: Any) -> int:
        request = urllib.request.Request(
            f"{daemon.url}/v1/predictions",
            data=json.dumps(CREATE).encode(),
            headers={"X-User-Id": "alice", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as refused:
            refused.close()
            return int(refused.code)

    def shown() -> dict[str, Any]:
        result = subprocess.run(
            [skyproxy, "budget", "show", "--json", "-c", str(path)], capture_output=True, timeout=60
        )
        report: dict[str, Any] = json.loads(result.stdout)
        return report

    daemon = run_daemon(path, port)
    assert [create(daemon) for _ in range(3)] == [201, 201, 201]
    audit = tmp_path / "audit/audit.jsonl"
    asyncio.run(eventually(lambda: len(audit_lines(audit)) == 3, "three lines on disk"))
    live = shown()
    assert live["source"].startswith("daemon") and live["budgets"][0]["spent_usd"] == 0.3
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    offline = shown()
    assert offline["source"].startswith("audit files") and offline["budgets"][0]["spent_usd"] == 0.3
    again = run_daemon(path, port)
    assert shown()["budgets"][0]["spent_usd"] == 0.3
    assert create(again) == 402
    again.signal(signal.SIGTERM)
    assert again.wait() == 0
    third = run_daemon(path, port)
    assert create(third) == 402


async def test_a_priced_create_asking_for_a_webhook_is_rewritten_whole(
    tmp_path: Path, canary_env: str, start_proxy: Callable[..., Any], raw_upstream: Callable[..., Any]
) -> None:
    # Budgets read a create's body in admission; the webhook rewrite must get it whole.
    upstream = Recorder()
    url = await raw_upstream(upstream.app())
    (tmp_path / "whsec").write_text(new_secret() + "\n")
    hooks = '[webhooks]\nlisten = ["127.0.0.1:0"]\nsigning_secret = "file:whsec"\n'
    proxy = await start_proxy(env_config(url, rules=NO_LIMITS, extra=PRICED + budget(0.15) + hooks))
    asked = {**CREATE, "webhook": {"url": "http://127.0.0.1:9/hook", "events": ["completed"]}}
    assert (await post(proxy, body=asked))[0] == 201
    sent = json.loads(upstream.bodies[0])
    assert sent["model"] == CREATE["model"] and sent["input"] == CREATE["input"]
    assert sent["webhook"]["url"] != "http://127.0.0.1:9/hook"  # routed through the receiver
    assert_error(402, "budget_exceeded", await post(proxy, body=asked))
    assert upstream.creates == 1


async def test_a_create_sent_with_content_encoding_identity_is_billed_by_the_model_it_names(
    canary_env: str, start_proxy: Callable[..., Any], raw_upstream: Callable[..., Any]
) -> None:
    # The answer names the model by its display name, which has no price: the create's
    # own body, read in admission, is what the created line's cost comes from.
    async def create(request: web.Request) -> web.Response:
        await request.read()
        answer = {"id": "pred_0001", "status": "starting", "model": {"name": "TrueFusion Pro"}}
        return web.json_response(answer, status=201)

    app = web.Application()
    app.router.add_post("/v1/predictions", create)
    url = await raw_upstream(app)
    proxy = await start_proxy(env_config(url, rules=NO_LIMITS, extra=PRICED + budget(0.15)))
    headers = {"X-User-Id": "alice", "Content-Encoding": "identity", "Content-Type": "application/json"}
    sent = json.dumps(CREATE).encode()
    created = await fetch(proxy.session, "POST", f"{proxy.url}/v1/predictions", data=sent, headers=headers)
    assert created[0] == 201
    await eventually(lambda: len(audit_lines(proxy.audit_path)) == 1, "the created line")
    line = audit_lines(proxy.audit_path)[0]
    assert (line["status"], line["model"], line["costUsd"]) == ("created", "truefusion-pro", 0.1)
    again = await fetch(proxy.session, "POST", f"{proxy.url}/v1/predictions", data=sent, headers=headers)
    assert_error(402, "budget_exceeded", again)  # 0.1 spent, and 0.1 more would pass 0.15


async def test_a_body_after_its_head_is_priced_by_its_model_and_a_chunked_one_at_the_dearest(
    canary_env: str, start_proxy: Callable[..., Any], raw_upstream: Callable[..., Any]
) -> None:
    # Admission prices a body in with its head from the buffer; one that follows is awaited
    # and priced the same; a chunked one streams on unread, so it reserves the dearest price.
    upstream = Recorder()
    url = await raw_upstream(upstream.app())
    prices = PRICED + "flux-max = 1.0\n"  # the dearest: more than the whole budget
    proxy = await start_proxy(env_config(url, rules=NO_LIMITS, extra=prices + budget(0.15)))
    sent = json.dumps(CREATE).encode()
    target = URL(proxy.url)

    async def raw_create(user: str, framing: tuple[str, str], body: bytes, pause: float) -> Any:
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            head = [("Host", host_of(proxy.url)), ("Content-Type", "application/json"), framing]
            writer.write(http_head("POST", "/v1/predictions", [*head, ("X-User-Id", user)]))
            await writer.drain()
            await asyncio.sleep(pause)  # the head alone first: admission finds no body yet
            writer.write(body)
            return await asyncio.wait_for(read_response(reader), 10)
        finally:
            writer.close()

    late = await raw_create("alice", ("Content-Length", str(len(sent))), sent, 0.2)
    assert late.status == 201, late.body  # 0.1 for truefusion-pro, not the dearest 1.0
    assert_error(402, "budget_exceeded", await post(proxy))  # 0.1 spent, and 0.1 more would pass 0.15
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(sent), sent)
    streamed = await raw_create("bob", ("Transfer-Encoding", "chunked"), chunked, 0.0)
    assert_error(402, "budget_exceeded", streamed)  # its model unknown: reserved at 1.0
    assert upstream.creates == 1
