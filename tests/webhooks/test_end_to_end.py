"""The whole path through a real daemon: create, rewrite, mock callback, receive, store, relay, audit."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import CANARY, Proxy, assert_no_canary, env_config, free_port, write_config
from helpers.daemon import Spawn, audit_lines, eventually
from helpers.http import assert_error, fetch, host_of, http_head, read_response
from helpers.webhooks import Target, file_bytes, start_target
from standardwebhooks import Webhook
from yarl import URL

from skyproxy.mock.app import MockState
from skyproxy.webhooks.signing import new_secret
from skyproxy.webhooks.store import Store

StartProxy = Callable[..., object]


def hooks_table(
    tmp_path: Path, listen: str = "127.0.0.1:0", schedule: str = "[0.2, 0.2, 0.2]"
) -> tuple[str, str]:
    secret = new_secret()
    (tmp_path / "whsec").write_text(secret + "\n")
    table = (
        f'[webhooks]\nlisten = ["{listen}"]\nsigning_secret = "file:whsec"\n'
        f'store = "state/webhooks.sqlite3"\nretry_schedule = {schedule}\n'
    )
    return table, secret


def create_body(url: str, form: str = "object") -> dict[str, object]:
    webhook: object = {"url": url, "events": ["started", "completed"]} if form == "object" else url
    return {"model": "truefusion-pro", "input": {"prompt": "a lighthouse"}, "webhook": webhook}


async def audit_settled(proxy: Proxy) -> None:
    """Returns once every audit line of the requests answered so far is on disk.

    A create's line is queued when its answer goes out, after the lines of every answer
    before it, and the writer keeps the queue's order: once a later create's line is on
    disk, an earlier (duplicate) terminal line would be there too.
    """
    _, _, raw = await fetch(
        proxy.session,
        "POST",
        f"{proxy.url}/v1/predictions",
        json={"model": "truefusion-pro", "input": {"prompt": "a marker"}},
        headers={"X-User-Id": "marker"},
    )
    marker = json.loads(raw)["id"]
    await eventually(
        lambda: any(line["predictionId"] == marker for line in audit_lines(proxy.audit_path)),
        "the marker line",
    )


def store_listing(path: Path) -> list:  # type: ignore[type-arg]
    store = Store(path)
    try:
        return store.listing()
    finally:
        store.close()


async def test_the_mock_flow_end_to_end(
    tmp_path: Path,
    canary_env: str,
    mock_upstream: tuple[str, MockState],
    start_proxy: StartProxy,
    servers: list[TestServer],
) -> None:
    upstream, mock = mock_upstream
    table, secret = hooks_table(tmp_path)
    proxy: Proxy = await start_proxy(env_config(upstream, extra=table))  # type: ignore[assignment]
    target = await start_target(servers)
    status, _, raw = await fetch(
        proxy.session,
        "POST",
        f"{proxy.url}/v1/predictions",
        json=create_body(target.url),
        headers={"X-User-Id": "alice"},
    )
    assert status == 201, raw
    created = json.loads(raw)
    pid = created["id"]
    # Links come back through the proxy.
    assert set(created["urls"]) == {"get", "cancel", "stream", "delete"}
    for link in created["urls"].values():
        assert link.startswith(f"{proxy.url}/v1/predictions/{pid}"), link
    await eventually(lambda: len(target.hits) == 2, "started and completed relayed to the app")
    payloads = [Webhook(secret).verify(hit.body, dict(hit.headers)) for hit in target.hits]
    assert [p["id"] for p in payloads] == [pid, pid]
    assert payloads[-1]["status"] == "succeeded"
    assert len({hit.headers["webhook-id"] for hit in target.hits}) == 2
    # A poll after the webhook: the terminal line is still written once.
    status, _, polled = await fetch(
        proxy.session, "GET", created["urls"]["get"], headers={"X-User-Id": "alice"}
    )
    assert status == 200 and json.loads(polled)["status"] == "succeeded"
    await eventually(
        lambda: any(line.get("status") == "succeeded" for line in audit_lines(proxy.audit_path)), "audit"
    )
    await audit_settled(proxy)  # the poll's own audit work is done by now
    terminal = [
        line
        for line in audit_lines(proxy.audit_path)
        if line["predictionId"] == pid and line["status"] != "created"
    ]
    assert [(line["status"], line["userId"], line["costUsd"]) for line in terminal] == [
        ("succeeded", "alice", 0.03)
    ]
    # Nothing the app received, and nothing in the store, holds the key.
    for hit in target.hits:
        assert CANARY.encode() not in hit.raw and CANARY[-12:].encode() not in hit.raw
        assert "X-Skytells-Signature" not in hit.headers
    assert_no_canary(raw.decode(), polled.decode())
    store_path = tmp_path / "state/webhooks.sqlite3"
    assert CANARY.encode() not in file_bytes(store_path)
    assert CANARY[-12:].encode() not in file_bytes(store_path)
    status, _, body = await fetch(proxy.session, "GET", f"{proxy.url}/-/status")
    hooks = json.loads(body)["webhooks"]
    assert hooks["received"] == 2 and hooks["delivered"] == 2
    status, _, metrics = await fetch(proxy.session, "GET", f"{proxy.url}/-/metrics")
    assert b"skyproxy_webhooks_delivered_total 2.0" in metrics
    assert b"skyproxy_webhooks_outbox_depth" in metrics
    assert mock.predictions[pid]["status"] == "succeeded"


async def test_poll_first_then_webhook_writes_the_terminal_line_once(
    tmp_path: Path,
    canary_env: str,
    mock_upstream: tuple[str, MockState],
    start_proxy: StartProxy,
    servers: list[TestServer],
) -> None:
    upstream, mock = mock_upstream
    mock.delay = 0.5
    table, _ = hooks_table(tmp_path)
    proxy: Proxy = await start_proxy(env_config(upstream, extra=table))  # type: ignore[assignment]
    target = await start_target(servers)
    _, _, raw = await fetch(
        proxy.session,
        "POST",
        f"{proxy.url}/v1/predictions",
        json=create_body(target.url, "string"),
        headers={"X-User-Id": "bob"},
    )
    pid = json.loads(raw)["id"]

    async def polled_terminal() -> bool:
        _, _, body = await fetch(
            proxy.session, "GET", f"{proxy.url}/v1/predictions/{pid}", headers={"X-User-Id": "bob"}
        )
        return json.loads(body)["status"] == "succeeded"

    await eventually(polled_terminal, "the poll saw it done")
    await eventually(lambda: len(target.hits) == 2, "the webhook came too")
    await audit_settled(proxy)  # the receiver's audit work for the second event is done by now
    terminal = [
        line
        for line in audit_lines(proxy.audit_path)
        if line["predictionId"] == pid and line["status"] != "created"
    ]
    assert [line["status"] for line in terminal] == ["succeeded"]


async def test_a_webhook_outside_allowed_targets_is_400_and_the_upstream_never_sees_it(
    tmp_path: Path, canary_env: str, mock_upstream: tuple[str, MockState], start_proxy: StartProxy
) -> None:
    upstream, mock = mock_upstream
    table, _ = hooks_table(tmp_path)
    proxy: Proxy = await start_proxy(env_config(upstream, extra=table))  # type: ignore[assignment]
    for body in (
        create_body("http://169.254.169.254/latest/meta-data"),
        create_body("http://127.0.0.1:80@evil.example/", "string"),
        create_body("https://app.example.com/hooks"),
    ):
        answer = await fetch(
            proxy.session, "POST", f"{proxy.url}/v1/predictions", json=body, headers={"X-User-Id": "a"}
        )
        assert_error(400, "webhook_target_not_allowed", answer)
    assert not [seen for seen in mock.seen if seen.method == "POST"]
    assert store_listing(tmp_path / "state/webhooks.sqlite3") == []


async def test_the_rewritten_create_keeps_everything_else_and_a_route_is_recorded_first(
    tmp_path: Path,
    canary_env: str,
    raw_upstream: Callable[[web.Application], object],
    start_proxy: StartProxy,
) -> None:
    seen: list[dict[str, object]] = []

    async def create(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response({"id": "p1", "status": "starting"}, status=201)

    app = web.Application()
    app.router.add_post("/v1/predict", create)
    upstream = await raw_upstream(app)  # type: ignore[misc]
    table, _ = hooks_table(tmp_path)
    proxy: Proxy = await start_proxy(env_config(upstream, extra=table))  # type: ignore[assignment]
    public = f"http://{proxy.server.webhooks.addresses()[0]}"
    sent = create_body("http://localhost:3000/hooks")
    sent["webhook_events_filter"] = ["completed"]
    status, _, _ = await fetch(
        proxy.session, "POST", f"{proxy.url}/v1/predict", json=sent, headers={"X-User-Id": "a"}
    )
    assert status == 201
    [forwarded] = seen
    url = forwarded["webhook"]["url"]  # type: ignore[index]
    assert url.startswith(f"{public}/hooks/dev/")
    assert forwarded["webhook"]["events"] == ["started", "completed"]  # type: ignore[index]
    assert {k: v for k, v in forwarded.items() if k != "webhook"} == {
        k: v for k, v in sent.items() if k != "webhook"
    }
    # A URL that already points at the receiver is left alone.
    await fetch(
        proxy.session,
        "POST",
        f"{proxy.url}/v1/predict",
        json=create_body(url, "string"),
        headers={"X-User-Id": "a"},
    )
    assert seen[1]["webhook"] == url
    # Without a "webhook" key the bytes go through untouched.
    raw = b'{"model":  "x",   "input": {}}'
    await fetch(
        proxy.session,
        "POST",
        f"{proxy.url}/v1/predict",
        data=raw,
        headers={"X-User-Id": "a", "Content-Type": "application/json"},
    )
    assert seen[2] == {"model": "x", "input": {}}


async def test_without_webhooks_a_create_passes_as_before(
    tmp_path: Path,
    canary_env: str,
    mock_upstream: tuple[str, MockState],
    start_proxy: StartProxy,
    servers: list[TestServer],
) -> None:
    upstream, _ = mock_upstream
    proxy: Proxy = await start_proxy(env_config(upstream))  # type: ignore[assignment]
    target = await start_target(servers)
    await fetch(
        proxy.session,
        "POST",
        f"{proxy.url}/v1/predictions",
        json=create_body(target.url),
        headers={"X-User-Id": "a"},
    )
    await eventually(lambda: len(target.hits) == 2, "the mock called the app itself")
    assert "X-Skytells-Signature" in target.hits[0].headers  # Skytells' own signature: the key is needed


async def test_links_work_through_the_proxy(
    tmp_path: Path, canary_env: str, mock_upstream: tuple[str, MockState], start_proxy: StartProxy
) -> None:
    upstream, mock = mock_upstream
    mock.delay = 0.2
    proxy: Proxy = await start_proxy(env_config(upstream))  # type: ignore[assignment]
    user = {"X-User-Id": "a"}
    _, _, raw = await fetch(
        proxy.session, "POST", f"{proxy.url}/v1/predictions", json={"model": "lumo"}, headers=user
    )
    urls = json.loads(raw)["urls"]
    assert all(u.startswith(proxy.url) for u in urls.values())
    status, _, got = await fetch(proxy.session, "GET", urls["get"], headers=user)
    assert status == 200 and json.loads(got)["id"] == json.loads(raw)["id"]
    assert json.loads(got)["urls"] == urls
    sse = {**user, "Accept": "text/event-stream"}
    status, _, streamed = await fetch(proxy.session, "GET", urls["stream"], headers=sse)
    assert status == 200 and streamed.startswith(b"data: ") and b"succeeded" in streamed
    status, _, listed = await fetch(proxy.session, "GET", f"{proxy.url}/v1/predictions", headers=user)
    assert json.loads(listed)["data"][0]["urls"] == urls
    status, _, cancelled = await fetch(proxy.session, "POST", urls["cancel"], headers=user)
    assert status == 200 and json.loads(cancelled)["urls"] == urls
    assert upstream.encode() not in got + listed + cancelled


async def test_pending_deliveries_survive_sigkill_and_resume(
    tmp_path: Path, mock_upstream: tuple[str, MockState], spawn: Spawn, servers: list[TestServer]
) -> None:
    upstream, _ = mock_upstream
    answering = asyncio.Event()

    async def stall_until_answering(n: int) -> web.Response:
        await answering.wait()  # the first daemon is killed with both attempts in flight
        return web.Response()

    target = await start_target(servers, Target(answer=stall_until_answering))
    port, hook_port = free_port(), free_port()
    table, secret = hooks_table(tmp_path, f"127.0.0.1:{hook_port}")
    config_path = write_config(tmp_path, env_config(upstream, listen=f"127.0.0.1:{port}", extra=table))
    daemon = await asyncio.to_thread(spawn, config_path, port)
    async with aiohttp.ClientSession() as session:
        status, _, _ = await fetch(
            session,
            "POST",
            f"{daemon.url}/v1/predictions",
            json=create_body(target.url),
            headers={"X-User-Id": "a"},
        )
        assert status == 201
        await eventually(
            lambda: len({h.headers["webhook-id"] for h in target.hits}) == 2, "both events tried"
        )
    daemon.signal(signal.SIGKILL)
    await asyncio.to_thread(daemon.wait)
    store_path = tmp_path / "state/webhooks.sqlite3"
    pending = {x.id for x in store_listing(store_path) if x.status == "pending"}
    assert len(pending) == 2
    answering.set()
    await asyncio.to_thread(spawn, config_path, port)
    await eventually(
        lambda: {x.id for x in store_listing(store_path) if x.status == "delivered"} == pending, "resumed"
    )
    delivered = [h for h in target.hits if h.headers["webhook-id"] in pending]
    for hit in delivered:
        Webhook(secret).verify(hit.body, dict(hit.headers))


@pytest.mark.parametrize("declared", [1_000, 1_000_000])  # read in one go, and streamed
async def test_a_webhook_create_whose_body_stops_arriving_is_408_after_idle_timeout(
    declared: int,
    tmp_path: Path,
    canary_env: str,
    mock_upstream: tuple[str, MockState],
    start_proxy: StartProxy,
) -> None:
    upstream, mock = mock_upstream
    table, _ = hooks_table(tmp_path)
    config = env_config(upstream, server="idle_timeout = 0.5\n", extra=table)
    proxy: Proxy = await start_proxy(config)  # type: ignore[assignment]
    target = URL(proxy.url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        head = [("Host", host_of(proxy.url)), ("Content-Length", str(declared)), ("X-User-Id", "a")]
        writer.write(http_head("POST", "/v1/predictions", head) + b'{"webhook": "ht')  # then silence
        answer = await asyncio.wait_for(read_response(reader), 30)
        assert_error(408, "body_timeout", answer)
    finally:
        writer.close()
    assert not [seen for seen in mock.seen if seen.method == "POST"]


async def test_a_webhook_create_that_keeps_arriving_outlasts_idle_timeout(
    tmp_path: Path, canary_env: str, mock_upstream: tuple[str, MockState], start_proxy: StartProxy
) -> None:
    upstream, _ = mock_upstream
    table, _ = hooks_table(tmp_path)
    config = env_config(upstream, server="idle_timeout = 2\n", extra=table)
    proxy: Proxy = await start_proxy(config)  # type: ignore[assignment]
    body = json.dumps(create_body("http://127.0.0.1:3000/hooks", "string")).encode() + b" " * 210_000
    pieces = [body[i : i + 7_000] for i in range(0, len(body), 7_000)]  # 31 pieces

    async def trickle() -> AsyncIterator[bytes]:
        for piece in pieces:
            await asyncio.sleep(0.1)  # each gap well inside idle_timeout, the whole well beyond it
            yield piece

    started = time.monotonic()
    status, _, raw = await fetch(
        proxy.session,
        "POST",
        f"{proxy.url}/v1/predictions",
        data=trickle(),
        headers={"X-User-Id": "a", "Content-Type": "application/json", "Content-Length": str(len(body))},
    )
    assert status == 201, raw
    assert time.monotonic() - started > 2
