"""The dashboard in a real headless Chromium: it loads clean, draws, updates live, refuses
strangers, and never shows a key."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import assert_no_canary, env_config
from helpers.browser import Browser
from helpers.daemon import create
from helpers.network import local_address
from helpers.webhooks import add_route, statuses
from yarl import URL

from skyproxy.webhooks.signing import new_secret
from skyproxy.webhooks.store import Store

BURST = (
    '[rate_limit]\nuser_header = "X-User-Id"\n[[rate_limit.rules]]\nname = "burst"\nmethods = ["POST"]\n'
    'paths = ["/v1/predictions"]\nper_user = "1/minute"\n'
)
CHARTS = ("chart-rate-15m", "chart-latency-15m", "chart-rate-24h", "chart-latency-24h")

DRAWN = """(id) => {
  const canvas = document.querySelector('#' + id + ' canvas');
  if (!canvas || canvas.width === 0 || canvas.height === 0) return 0;
  const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = 0;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) painted++;
  return painted;
}"""


async def open_live(browser: Browser, url: str):  # type: ignore[no-untyped-def]
    page = await browser.context.new_page()
    answer = await page.goto(url + "/-/")
    assert answer is not None and answer.status == 200
    await page.locator("#state.good").wait_for(timeout=10_000)  # "live": the first polls answered
    return page


async def test_the_page_loads_clean_and_draws_its_charts(
    browser, mock_upstream, start_proxy, canary_env, tmp_path
):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    for user in ("alice", "bob", "carol"):
        assert (await create(proxy.session, proxy.url, user=user))[0] == 201
    page = await open_live(browser, proxy.url)
    await page.locator("#prediction-list tbody tr").nth(2).wait_for()
    for chart in CHARTS:
        assert await page.locator(f"#{chart} canvas").count() == 1, chart
        # Drawn: axes, grid and lines are pixels on the canvas, not an empty box.
        assert await page.evaluate(DRAWN, chart) > 500, chart
    await page.locator("#key-list tbody tr").first.wait_for()
    shot = tmp_path / "dashboard.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert browser.console_errors == []


async def test_a_prediction_made_through_the_proxy_appears_within_2_seconds(
    browser, mock_upstream, start_proxy, canary_env
):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    page = await open_live(browser, proxy.url)
    status, body = await create(proxy.session, proxy.url, user="dora")
    assert status == 201
    made = time.monotonic()
    await page.locator("#prediction-list").get_by_text(str(body["id"])).wait_for(timeout=2_000)
    assert time.monotonic() - made < 2.0
    row = page.locator("#prediction-list tbody tr", has_text=str(body["id"]))
    assert "dora" in await row.inner_text()
    assert browser.console_errors == []


async def test_a_429_shows_under_its_rule(browser, mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, rules=BURST))
    page = await open_live(browser, proxy.url)
    assert (await create(proxy.session, proxy.url, user="erin"))[0] == 201
    assert (await create(proxy.session, proxy.url, user="erin"))[0] == 429
    row = page.locator("#rejections tbody tr", has_text="burst")
    await row.wait_for(timeout=5_000)
    await row.locator("td:nth-child(2)", has_text=re.compile(r"^1$")).wait_for(timeout=5_000)
    assert (await row.locator("td").all_inner_texts())[:2] == ["burst", "1"]  # the rule, its 429s
    assert browser.console_errors == []


@pytest.fixture
def own_address() -> str:
    address = local_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    return address


async def test_the_page_refuses_a_client_from_another_address(
    browser, own_address, mock_upstream, start_proxy, canary_env
):
    url, _ = mock_upstream
    server = f'allowed_networks = ["{own_address}/32"]\nallowed_hosts = ["{own_address}"]'
    proxy = await start_proxy(env_config(url, listen="0.0.0.0:0", server=server))
    page = await browser.context.new_page()
    answer = await page.goto(f"http://{own_address}:{URL(proxy.url).port}/-/")
    assert answer is not None and answer.status == 403
    assert "admin_not_allowed" in await page.content()
    assert await page.locator("#chart-rate-15m").count() == 0


async def test_a_page_of_another_origin_cannot_read_or_replay(
    browser, mock_upstream, start_proxy, canary_env
):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    _ = await open_live(browser, proxy.url)  # the real page, so its token exists

    attack = f"""<!doctype html><script>
      window.results = [];
      const base = "{proxy.url}";
      const note = (what) => (r) => results.push(what + " " + r.type);
      const fail = (what) => () => results.push(what + " blocked");
      fetch(base + "/-/api/keys").then(note("read"), fail("read"));
      fetch(base + "/-/api/tokens", {{mode: "no-cors"}}).then(note("peek"), fail("peek"));
      fetch(base + "/-/api/webhooks/replay", {{method: "POST", body: '{{"id":"x"}}',
        headers: {{"Content-Type": "text/plain"}}, mode: "no-cors"}}).then(note("replay"), fail("replay"));
    </script>"""

    async def evil(request: web.Request) -> web.Response:
        return web.Response(text=attack, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", evil)
    other = TestServer(app, host="127.0.0.1")
    await other.start_server()
    try:
        page = await browser.context.new_page()
        await page.goto(str(other.make_url("/")))
        await page.wait_for_function("window.results.length === 3", timeout=10_000)
        results = await page.evaluate("window.results")
        # No CORS header: a readable fetch fails, and a no-cors one gets an opaque answer.
        assert sorted(results) == ["peek opaque", "read blocked", "replay opaque"]
        for _ in range(100):
            refused = [
                r for r in browser.responses if r.url.startswith(proxy.url + "/-/api/") and r.status == 403
            ]
            if len(refused) >= 2:
                break
            await asyncio.sleep(0.05)
        assert sorted(r.url.rsplit("/", 1)[-1] for r in refused) == ["replay", "tokens"]
    finally:
        await other.close()


async def test_no_key_appears_in_the_dom_or_in_any_response(
    browser, mock_upstream, start_proxy, canary_env, tmp_path
):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, rules=BURST))
    await create(proxy.session, proxy.url, user="frank")
    await create(proxy.session, proxy.url, user="frank")
    page = await open_live(browser, proxy.url)
    for table in ("prediction-list", "key-list", "rejections"):
        await page.locator(f"#{table} tbody tr").first.wait_for()
    await page.locator("#health-list dt").nth(4).wait_for()
    dom = await page.content()
    text = await page.inner_text("body")
    bodies = []
    for answer in list(browser.responses):
        try:
            bodies.append((await answer.body()).decode("utf-8", "replace"))
        except Exception:  # a response the browser has dropped since: nothing left to scan
            continue
        bodies.append(str(await answer.all_headers()))
    assert len(bodies) >= 10
    assert_no_canary(dom, text, *bodies)


async def test_the_replay_button_queues_a_dead_delivery_again(
    browser, mock_upstream, start_proxy, canary_env, tmp_path
):
    url, _ = mock_upstream
    (tmp_path / "whsec").write_text(new_secret() + "\n")
    store_path = tmp_path / "state" / "webhooks.sqlite3"
    route = add_route(store_path, "http://127.0.0.1:9/hooks/app")
    store = Store(store_path)
    try:
        receipt = store.receive(
            "dev", route, b'{"id":"p-1"}', "application/json", "p-1", "completed", time.time()
        )
        assert receipt.event_id is not None
        store.dead(receipt.event_id, 8, "HTTP 500")
    finally:
        store.close()
    hooks = (
        '[webhooks]\nlisten = ["127.0.0.1:0"]\nsigning_secret = "file:whsec"\n'
        'store = "state/webhooks.sqlite3"\nretry_schedule = [30]\n'
    )
    proxy = await start_proxy(env_config(url, extra=hooks))
    page = await open_live(browser, proxy.url)
    button = page.locator("#dead-list button", has_text="Replay")
    await button.wait_for(timeout=10_000)
    await button.click()
    await page.locator("#replay-result", has_text="queued").wait_for(timeout=5_000)
    assert statuses(store_path)[receipt.event_id][0] == "pending"
    assert browser.console_errors == []
