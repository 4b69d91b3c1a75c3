"""The guard against browsers, DNS rebinding and foreign networks, on a real proxy.

Every refused request must be answered by the proxy itself: the mock upstream records
what reaches it, and it must see nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re

import aiohttp
import pytest
from helpers import CANARY, env_config, write_config
from helpers.network import local_address
from multidict import CIMultiDict
from yarl import URL

from skyproxy import __version__, config
from skyproxy.errors import ConfigError
from skyproxy.keys.secret import fingerprint

SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
ORIGIN = "http://localhost:3000"
ALLOWED = f'allowed_origins = ["{ORIGIN}", "https://App.Example.com"]'


async def get(
    session: aiohttp.ClientSession, url: str, path: str = "/v1/models", method: str = "GET", **headers: str
) -> tuple[int, CIMultiDict[str], bytes]:
    async with session.request(method, f"{url}{path}", headers=headers) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


def assert_refused(answer: tuple[int, CIMultiDict[str], bytes], code: str, status: int = 403) -> None:
    got, headers, body = answer
    assert got == status, body
    error = json.loads(body)["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == headers["X-Request-Id"]
    assert SANE_ID.fullmatch(headers["X-Request-Id"])
    assert "Access-Control-Allow-Origin" not in headers


async def raw_status(url: str, request: bytes) -> tuple[int, bytes]:
    target = URL(url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# -- Host: DNS rebinding ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8787",
        "EVIL.Example.",
        "localhost.evil.example",
        "127.0.0.1.nip.io:8787",
        "localhost@evil.example",
        "0.0.0.0:8787",
        "127.0.0.2",
        "",
    ],
)
async def test_foreign_host_is_refused(host, mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url))
    assert_refused(await get(proxy.session, proxy.url, Host=host), "host_not_allowed")
    assert_refused(await get(proxy.session, proxy.url, "/-/status", Host=host), "host_not_allowed")
    assert not state.seen


async def test_request_without_host_is_refused(mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url))
    status, body = await raw_status(proxy.url, b"GET /v1/models HTTP/1.0\r\n\r\n")
    assert status == 403
    assert json.loads(body)["error"]["code"] == "host_not_allowed"
    assert not state.seen


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST:8787",
        "localhost.",
        "127.0.0.1",
        "127.0.0.1:1",
        "[::1]",
        "[::1]:8787",
        "proxy.internal",
        "Proxy.Internal:443",
    ],
)
async def test_loopback_and_allowed_hosts_are_accepted(host, mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url, server='allowed_hosts = ["proxy.internal"]'))
    status, _, body = await get(proxy.session, proxy.url, Host=host)
    assert status == 200, body
    assert len(state.seen) == 1


async def test_listen_host_is_accepted(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, listen="127.0.0.2:0"))
    port = URL(proxy.url).port
    status, _, body = await get(proxy.session, proxy.url, Host=f"127.0.0.2:{port}")
    assert status == 200, body


# -- Origin and Sec-Fetch-Site: browsers ------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "http://localhost:3001", "https://localhost:3000", "null", "file://", ""],
)
async def test_foreign_origin_is_refused(origin, mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url, server=ALLOWED))
    assert_refused(await get(proxy.session, proxy.url, Origin=origin), "origin_not_allowed")
    assert not state.seen


async def test_any_origin_is_refused_when_none_is_allowed(mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url))
    assert_refused(await get(proxy.session, proxy.url, Origin=ORIGIN), "origin_not_allowed")
    assert not state.seen


@pytest.mark.parametrize("origin", [ORIGIN, "https://app.example.com", "HTTPS://APP.EXAMPLE.COM"])
async def test_allowed_origin_gets_cors_headers_for_itself(origin, mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, server=ALLOWED))
    status, headers, _ = await get(proxy.session, proxy.url, Origin=origin)
    assert status == 200
    assert headers.getall("Access-Control-Allow-Origin") == [origin]
    assert "Origin" in ", ".join(headers.getall("Vary"))
    status, headers, _ = await get(proxy.session, proxy.url)
    assert status == 200
    assert "Access-Control-Allow-Origin" not in headers


@pytest.mark.parametrize("value", ["null", "*"])
def test_config_refuses_wildcard_and_null_origins(value, tmp_path):
    path = write_config(
        tmp_path, env_config("http://127.0.0.1:1", server=f'allowed_origins = ["{ORIGIN}", "{value}"]')
    )
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.field == "server.allowed_origins[1]"
    assert "never allowed" in str(caught.value)
    assert caught.value.line == 4


async def test_preflight_is_answered_by_the_proxy(mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url, server=ALLOWED))
    status, headers, body = await get(
        proxy.session,
        proxy.url,
        "/v1/predictions",
        method="OPTIONS",
        Origin=ORIGIN,
        **{
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-user-id",
            "X-Request-Id": "pre-1",
        },
    )
    assert status == 204
    assert body == b""
    assert headers.getall("Access-Control-Allow-Origin") == [ORIGIN]
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "content-type, x-user-id"
    assert "Origin" in headers["Vary"]
    assert headers["X-Request-Id"] == "pre-1"
    assert not state.seen


@pytest.mark.parametrize("origin", ["http://evil.example", None])
async def test_preflight_from_a_foreign_origin_is_refused(origin, mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url, server=ALLOWED))
    headers = {"Access-Control-Request-Method": "POST"}
    if origin is not None:
        headers["Origin"] = origin
    answer = await get(proxy.session, proxy.url, "/v1/predictions", method="OPTIONS", **headers)
    assert_refused(answer, "origin_not_allowed")
    assert not state.seen


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
async def test_cross_site_browser_request_without_origin_is_refused(
    site, mock_upstream, start_proxy, canary_env
):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url, server=ALLOWED))
    answer = await get(proxy.session, proxy.url, **{"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "no-cors"})
    assert_refused(answer, "origin_not_allowed")
    assert not state.seen


@pytest.mark.parametrize("site", ["same-origin", "none"])
async def test_same_origin_or_user_initiated_fetch_is_served(site, mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    status, _, _ = await get(proxy.session, proxy.url, **{"Sec-Fetch-Site": site})
    assert status == 200


# -- networks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:8787", "[::]:8787", "192.0.2.10:8787"])
def test_non_loopback_listen_needs_allowed_networks(listen, tmp_path):
    path = write_config(tmp_path, env_config("http://127.0.0.1:1", listen=listen))
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.field == "environments.dev.listen[0]"
    assert "allowed_networks" in str(caught.value)


@pytest.fixture
def own_address() -> str:
    address = local_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    return address


def other_network(address: str) -> str:
    for candidate in ("10.99.0.0/16", "172.31.99.0/24"):
        if ipaddress.ip_address(address) not in ipaddress.ip_network(candidate):
            return candidate
    raise AssertionError("unreachable")


async def test_client_outside_allowed_networks_is_refused(
    own_address, mock_upstream, start_proxy, canary_env
):
    url, state = mock_upstream
    server = f'allowed_networks = ["{other_network(own_address)}"]\nallowed_hosts = ["{own_address}"]'
    proxy = await start_proxy(env_config(url, listen="0.0.0.0:0", server=server))
    port = URL(proxy.url).port
    outside = f"http://{own_address}:{port}"
    assert_refused(await get(proxy.session, outside), "network_not_allowed")
    assert_refused(await get(proxy.session, outside, "/-/health"), "network_not_allowed")
    assert not state.seen
    status, _, _ = await get(proxy.session, f"http://127.0.0.1:{port}")
    assert status == 200  # loopback clients are always allowed


async def test_client_inside_allowed_networks_is_served_but_not_admin(
    own_address, mock_upstream, start_proxy, canary_env
):
    url, state = mock_upstream
    server = f'allowed_networks = ["{own_address}/32"]\nallowed_hosts = ["{own_address}"]'
    proxy = await start_proxy(env_config(url, listen="0.0.0.0:0", server=server))
    inside = f"http://{own_address}:{URL(proxy.url).port}"
    status, _, body = await get(proxy.session, inside)
    assert status == 200, body
    assert state.seen[-1].headers["x-api-key"] == CANARY
    for path in ("/-/health", "/-/status", "/-/metrics"):
        assert_refused(await get(proxy.session, inside, path), "admin_not_allowed")


# -- admin endpoints ----------------------------------------------------------------------------


async def test_health_and_status_are_answered_not_forwarded(mock_upstream, start_proxy, canary_env, tmp_path):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url))
    await get(proxy.session, proxy.url)  # one proxied request, counted below
    status, _, body = await get(proxy.session, proxy.url, "/-/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, headers, body = await get(proxy.session, proxy.url, "/-/status")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["version"] == __version__
    assert isinstance(doc["uptime_s"], (int, float)) and doc["uptime_s"] >= 0
    cfg = doc["config"]
    assert cfg["path"] == str((tmp_path / "skyproxy.toml").resolve())
    assert cfg["generation"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", cfg["loaded_at"])
    assert cfg["last_reload_error"] is None
    dev = doc["environments"]["dev"]
    assert dev["listen"] == ["127.0.0.1:0"]
    assert dev["upstream"] == url
    assert dev["key"]["source"] == "env:SKYPROXY_TEST_KEY"
    assert dev["key"]["fingerprint"] == fingerprint(CANARY)
    assert dev["key"]["age_days"] is None or isinstance(dev["key"]["age_days"], int)
    assert dev["requests"] == 1
    assert CANARY not in body.decode()
    assert [s.path for s in state.seen] == ["/v1/models"]


@pytest.mark.parametrize(
    ("method", "path", "code", "allow"),
    [
        ("GET", "/-/nothing", "not_found", None),
        ("GET", "/-/health/x", "not_found", None),
        ("POST", "/-/health", "method_not_allowed", "GET, HEAD"),
        ("DELETE", "/-/metrics", "method_not_allowed", "GET, HEAD"),
        ("GET", "/-/reload", "method_not_allowed", "POST"),
    ],
)
async def test_other_admin_looking_paths_are_not_forwarded(
    method, path, code, allow, mock_upstream, start_proxy, canary_env
):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url))
    answer = await get(proxy.session, proxy.url, path, method=method)
    assert_refused(answer, code, 405 if allow else 404)
    assert answer[1].get("Allow") == allow
    assert answer[1]["X-Request-Id"]
    assert not state.seen


async def test_admin_method_refusal_comes_after_the_guard(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    answer = await get(proxy.session, proxy.url, "/-/reload", Host="evil.example")
    assert_refused(answer, "host_not_allowed")


async def test_head_of_an_admin_read_has_no_body(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    status, headers, body = await get(proxy.session, proxy.url, "/-/health", method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Type"].startswith("application/json")


async def test_admin_answers_carry_a_request_id(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    for path in ("/-/health", "/-/status", "/-/metrics"):
        async with proxy.session.get(f"{proxy.url}{path}", headers={"X-Request-Id": "trace-42"}) as r:
            assert r.status == 200
            assert r.headers["X-Request-Id"] == "trace-42"
