"""/-/ and /-/api/ over HTTP: the admin paths' rules, strict headers, CSRF on the one write."""

from __future__ import annotations

import gc
import json
import re
import time
import weakref
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import pytest
from helpers import CANARY, assert_no_canary, env_config
from helpers.access import assert_secrets_absent
from helpers.daemon import CREATE, create, eventually
from helpers.http import assert_error, fetch
from helpers.network import local_address
from helpers.webhooks import add_route, statuses
from multidict import CIMultiDict
from yarl import URL

from skyproxy.dashboard import assets
from skyproxy.keys.secret import fingerprint
from skyproxy.ops import dashboard
from skyproxy.ops.dashboard_docs import DOCUMENTS
from skyproxy.tokens import store as token_store
from skyproxy.webhooks.signing import new_secret
from skyproxy.webhooks.store import Store

APIS = [f"/-/api/{name}" for name in DOCUMENTS]
PAGES = ["/-/", *(f"/-/{path}" for path in assets.FILES)]


def assert_hardened(headers: CIMultiDict[str]) -> None:
    policy = headers["Content-Security-Policy"]
    assert policy.startswith("default-src 'self'")
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"


def csrf_of(page: bytes) -> str:
    found = re.search(rb'<meta name="skyproxy-csrf" content="([^"]+)">', page)
    assert found is not None
    return found.group(1).decode()


async def test_the_page_its_files_and_every_api_answer_with_strict_headers(
    mock_upstream, start_proxy, canary_env
):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    assert (await create(proxy.session, proxy.url))[0] == 201
    seen = []
    for path in PAGES + APIS:
        status, headers, body = await fetch(proxy.session, "GET", proxy.url + path)
        assert status == 200, (path, body)
        assert_hardened(headers)
        seen.append(body.decode())
        if path.startswith("/-/api/"):
            assert headers["Content-Type"] == "application/json"
            assert headers["Cache-Control"] == "no-store"
            json.loads(body)
    assert seen[0].startswith("<!doctype html>")
    status, headers, body = await fetch(proxy.session, "HEAD", proxy.url + "/-/api/summary")
    assert status == 200 and body == b""
    assert_no_canary(*seen)


@pytest.mark.parametrize("path", ["/-/", "/-/api/summary", "/-/static/app.js"])
async def test_a_foreign_origin_is_refused_even_one_the_proxy_allows(
    path, mock_upstream, start_proxy, canary_env
):
    url, _ = mock_upstream
    server = 'allowed_origins = ["http://localhost:3000"]'
    proxy = await start_proxy(env_config(url, server=server))
    for origin in ("http://evil.example", "http://localhost:3000", "null"):
        answer = await fetch(proxy.session, "GET", proxy.url + path, headers={"Origin": origin})
        assert_error(403, "origin_not_allowed", answer)
        assert_hardened(answer[1])
    own = f"http://{URL(proxy.url).raw_authority}"
    status, _, _ = await fetch(proxy.session, "GET", proxy.url + path, headers={"Origin": own})
    assert status == 200


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
async def test_a_cross_site_fetch_without_origin_is_refused(site, mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    answer = await fetch(proxy.session, "GET", proxy.url + "/-/api/keys", headers={"Sec-Fetch-Site": site})
    assert_error(403, "origin_not_allowed", answer)


async def test_a_foreign_host_is_refused(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    answer = await fetch(proxy.session, "GET", proxy.url + "/-/", headers={"Host": "rebound.example"})
    assert_error(403, "host_not_allowed", answer)


async def test_the_replay_post_needs_the_pages_token_and_its_own_origin(
    mock_upstream, start_proxy, canary_env
):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    _, _, page = await fetch(proxy.session, "GET", proxy.url + "/-/")
    token = csrf_of(page)
    own = f"http://{URL(proxy.url).raw_authority}"
    replay = proxy.url + "/-/api/webhooks/replay"
    body = json.dumps({"id": "msg_0"})
    for headers in (
        {"Origin": own},  # no token: what a form on another page could send, were it same-origin
        {"Origin": own, "X-Skyproxy-Csrf": token[:-1] + "x"},
        {"X-Skyproxy-Csrf": token},  # no Origin: not a browser's fetch from the page
    ):
        assert_error(
            403, "csrf_refused", await fetch(proxy.session, "POST", replay, data=body, headers=headers)
        )
    foreign = {"Origin": "http://evil.example", "X-Skyproxy-Csrf": token}
    assert_error(
        403, "origin_not_allowed", await fetch(proxy.session, "POST", replay, data=body, headers=foreign)
    )
    mine = {"Origin": own, "X-Skyproxy-Csrf": token}
    assert_error(404, "webhooks_off", await fetch(proxy.session, "POST", replay, data=body, headers=mine))
    status, headers, _ = await fetch(proxy.session, "GET", replay)
    assert status == 405 and headers["Allow"] == "POST"
    status, headers, _ = await fetch(proxy.session, "POST", proxy.url + "/-/api/summary", headers=mine)
    assert status == 405 and headers["Allow"] == "GET, HEAD"


@pytest.fixture
def own_address() -> str:
    address = local_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    return address


async def test_a_client_on_an_allowed_network_is_refused_unless_dashboard_networks_has_it(
    own_address, mock_upstream, start_proxy, canary_env
):
    url, _ = mock_upstream
    server = f'allowed_networks = ["{own_address}/32"]\nallowed_hosts = ["{own_address}"]'
    proxy = await start_proxy(env_config(url, listen="0.0.0.0:0", server=server))
    inside = f"http://{own_address}:{URL(proxy.url).port}"
    status, _, _ = await fetch(proxy.session, "GET", inside + "/v1/models")
    assert status == 200  # the proxy serves this client
    for path in ("/-/", "/-/api/summary", "/-/api/keys", "/-/static/app.js"):
        answer = await fetch(proxy.session, "GET", inside + path)
        assert_error(403, "admin_not_allowed", answer)
        assert_hardened(answer[1])
    await proxy.server.stop()

    server += f'\ndashboard_networks = ["{own_address}/32"]'
    proxy = await start_proxy(env_config(url, listen="0.0.0.0:0", server=server))
    inside = f"http://{own_address}:{URL(proxy.url).port}"
    for path in ("/-/", "/-/api/summary"):
        status, _, body = await fetch(proxy.session, "GET", inside + path)
        assert status == 200, body


async def test_the_apis_show_a_prediction_and_its_spend(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, extra='[pricing]\n"truefusion-pro" = 0.25\n'))
    status, body = await create(proxy.session, proxy.url, user="carol")
    assert status == 201

    async def shown() -> bool:
        _, _, raw = await fetch(proxy.session, "GET", proxy.url + "/-/api/predictions")
        return any(p["predictionId"] == body["id"] for p in json.loads(raw)["predictions"])

    await eventually(shown, "the prediction in /-/api/predictions")
    _, _, raw = await fetch(proxy.session, "GET", proxy.url + "/-/api/spend")
    spend = json.loads(raw)
    assert spend["today"]["usd"] == pytest.approx(0.25)
    assert {"key": "carol", "usd": 0.25} in spend["month"]["by"]["user"]
    assert {"key": "truefusion-pro", "usd": 0.25} in spend["today"]["by"]["model"]
    _, _, raw = await fetch(proxy.session, "GET", proxy.url + "/-/api/keys")
    (key,) = json.loads(raw)["keys"]
    assert key["environment"] == "dev" and key["source"] == "env:SKYPROXY_TEST_KEY"
    assert key["last_401"] is None
    assert_no_canary(raw)


def dead_event(store_path: Path, target: str) -> str:
    route = add_route(store_path, target)
    store = Store(store_path)
    try:
        receipt = store.receive(
            "dev", route, b'{"id":"p-1"}', "application/json", "p-1", "completed", time.time()
        )
        assert receipt.event_id is not None
        store.dead(receipt.event_id, 8, "HTTP 500")
        return receipt.event_id
    finally:
        store.close()


async def test_a_dead_delivery_is_listed_and_replayed(tmp_path, mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    (tmp_path / "whsec").write_text(new_secret() + "\n")
    store_path = tmp_path / "state" / "webhooks.sqlite3"
    target = "http://127.0.0.1:9/hooks/app?secret=app-own-secret"
    event_id = dead_event(store_path, target)
    hooks = (
        '[webhooks]\nlisten = ["127.0.0.1:0"]\nsigning_secret = "file:whsec"\n'
        'store = "state/webhooks.sqlite3"\nretry_schedule = [30]\n'
    )
    proxy = await start_proxy(env_config(url, extra=hooks))
    _, _, raw = await fetch(proxy.session, "GET", proxy.url + "/-/api/webhooks")
    doc = json.loads(raw)
    assert doc["enabled"] is True
    assert [d["id"] for d in doc["dead"]] == [event_id]
    assert doc["dead"][0]["target"] == "http://127.0.0.1:9"
    assert b"app-own-secret" not in raw and b"/hooks/app" not in raw
    _, _, page = await fetch(proxy.session, "GET", proxy.url + "/-/")
    headers = {"Origin": f"http://{URL(proxy.url).raw_authority}", "X-Skyproxy-Csrf": csrf_of(page)}
    replay = proxy.url + "/-/api/webhooks/replay"
    status, _, raw = await fetch(proxy.session, "POST", replay, json={"id": event_id}, headers=headers)
    assert status == 200, raw
    assert json.loads(raw) == {"ok": True, "id": event_id, "was": "dead"}
    assert statuses(store_path)[event_id][0] == "pending"
    answer = await fetch(proxy.session, "POST", replay, json={"id": event_id}, headers=headers)
    assert_error(409, "replay_refused", answer)  # pending now: nothing to replay
    for bad in (b"{", b'{"id": 3}', b"[]", b'{"id": ""}', b"x" * 5000):
        answer = await fetch(proxy.session, "POST", replay, data=bad, headers=headers)
        assert_error(400, "invalid_replay", answer)


async def test_the_apis_never_hold_a_key(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    await create(proxy.session, proxy.url)
    async with aiohttp.ClientSession() as session:
        for path in PAGES + APIS + ["/-/api/traffic?window=24h"]:
            _, headers, body = await fetch(session, "GET", proxy.url + path)
            assert_no_canary(body.decode(), dict(headers))
    assert CANARY


async def test_after_a_reload_to_another_audit_file_the_page_follows_it(
    tmp_path, mock_upstream, start_proxy, canary_env
):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    first = (await create(proxy.session, proxy.url, user="before"))[1]["id"]

    async def listed() -> list[str]:
        _, _, raw = await fetch(proxy.session, "GET", proxy.url + "/-/api/predictions")
        return [p["predictionId"] for p in json.loads(raw)["predictions"]]

    await eventually(lambda: _contains(listed(), first), "the first prediction")
    config = (tmp_path / "skyproxy.toml").read_text().replace("audit/audit.jsonl", "audit2/audit.jsonl")
    (tmp_path / "skyproxy.toml").write_text(config)
    status, _, raw = await fetch(proxy.session, "POST", proxy.url + "/-/reload")
    assert status == 200, raw
    second = (await create(proxy.session, proxy.url, user="after"))[1]["id"]
    await eventually(lambda: _contains(listed(), second), "the prediction written to the new file")
    assert (tmp_path / "audit2" / "audit.jsonl").exists()


async def _contains(found, wanted: object) -> bool:  # type: ignore[no-untyped-def]
    return wanted in await found


async def test_a_stopped_daemons_dashboard_is_let_go(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    await fetch(proxy.session, "GET", proxy.url + "/-/api/summary")
    state = weakref.ref(proxy.state)
    assert state() in dashboard._dashboards
    await proxy.server.stop()
    proxy.server.state = None
    gc.collect()
    assert state() is None, "the registry keeps a stopped daemon's state alive"


async def test_tokens_show_names_users_and_last_use_never_the_token(
    tmp_path, mock_upstream, start_proxy, canary_env
):
    url, _ = mock_upstream
    tokens = tmp_path / "tokens.json"
    bound = token_store.create(tokens, "nightly", ["dev"], user="batch").reveal()
    token_store.create(tokens, "idle-app", ["dev"], trust_user_header=True)
    extra = f'[tokens]\nfile = "{tokens}"\n'
    proxy = await start_proxy(env_config(url, extra=extra, env_extra='client_auth = "optional"'))
    status, _, _ = await fetch(
        proxy.session, "POST", proxy.url + "/v1/predictions", json=CREATE, headers={"x-api-key": bound}
    )
    assert status == 201
    _, _, raw = await fetch(proxy.session, "GET", proxy.url + "/-/api/tokens")
    rows = {row["name"]: row for row in json.loads(raw)["tokens"]}
    assert rows["nightly"]["user"] == "batch" and rows["nightly"]["last_used"] is not None
    assert rows["idle-app"]["binding"] == "user header" and rows["idle-app"]["last_used"] is None
    assert_secrets_absent([bound], raw.decode())


async def test_a_key_past_max_age_days_is_flagged(tmp_path, mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    state = tmp_path / "keys.json"
    set_at = (datetime.now(timezone.utc) - timedelta(days=120)).isoformat()
    state.write_text(json.dumps({"keys": {"dev": {"fingerprint": fingerprint(CANARY), "set_at": set_at}}}))
    proxy = await start_proxy(env_config(url, extra=f'[keys]\nstate_file = "{state}"\n'))
    _, _, raw = await fetch(proxy.session, "GET", proxy.url + "/-/api/keys")
    (key,) = json.loads(raw)["keys"]
    assert (key["age_days"], key["max_age_days"], key["too_old"]) == (120, 90, True)
