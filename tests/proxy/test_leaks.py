"""The key never leaves: drive every kind of answer with the canary key, then scan it all.

Responses (bodies and headers), log records at DEBUG, the audit trail and key state, the
reprs of the live objects and the text of errors must never hold the key or its tail.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import signal
import traceback
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from helpers import CANARY, assert_no_canary, free_port, write_config

from skyproxy import config
from skyproxy.config import KeySpec
from skyproxy.daemon.supervisor import StartupError, Supervisor
from skyproxy.errors import ConfigError, KeySourceError
from skyproxy.keys.secret import Secret, fingerprint
from skyproxy.keys.sources import resolve
from skyproxy.mock.app import create_mock_app

FINGERPRINT = fingerprint(CANARY)
ORIGIN = "http://localhost:3000"
USER = {"X-User-Id": "alice"}


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record at DEBUG, skyproxy's included even where its logger does not propagate."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="skyproxy")
    logger = logging.getLogger("skyproxy")
    attached = not logger.propagate
    if attached:
        logger.addHandler(caplog.handler)
    yield caplog
    if attached:
        logger.removeHandler(caplog.handler)


def records_text(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [caplog.text] + [f"{r.getMessage()} {r.args!r} {r.exc_text}" for r in caplog.records]


@pytest.fixture
def released() -> Iterator[asyncio.Event]:
    """Lets the leaky upstream's stalled handler finish when the test is over."""
    event = asyncio.Event()
    yield event
    event.set()


def leaky_app(release: asyncio.Event) -> web.Application:
    """An upstream that does its worst with the key it receives."""

    def key_of(request: web.Request) -> str:
        return request.headers.get("x-api-key", "")

    async def plain(request: web.Request) -> web.Response:
        text = json.dumps({"error": {"message": f"bad key {key_of(request)}", "echo": key_of(request)}})
        return web.Response(status=400, text=text, content_type="application/json")

    async def gzipped(request: web.Request) -> web.Response:
        body = gzip.compress(f"denied: {key_of(request)}".encode())
        return web.Response(status=403, body=body, headers={"Content-Encoding": "gzip"})

    async def pieces(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=500, headers={"X-Echo-Key": key_of(request)})
        await response.prepare(request)
        data = f"internal error for {key_of(request)}!".encode()
        for i in range(0, len(data), 5):
            await response.write(data[i : i + 5])
            await asyncio.sleep(0.01)  # separate reads at the proxy
        await response.write_eof()
        return response

    async def unauthorized(request: web.Request) -> web.Response:
        body = {"status": False, "response": f"Unauthorized {key_of(request)}", "error": {"http_status": 401}}
        return web.json_response(body, status=401, headers={"WWW-Authenticate": f"key={key_of(request)}"})

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"late": key_of(request)})

    app = web.Application()
    app.router.add_post("/v1/predictions", plain)
    app.router.add_get("/v1/gz", gzipped)
    app.router.add_get("/v1/pieces", pieces)
    app.router.add_get("/v1/unauthorized", unauthorized)
    app.router.add_get("/v1/slow", slow)
    return app


def multi_env_config(mock: str, rejecting: str, leaky: str, dead: str, key_line: str) -> str:
    def env(name: str, host: str, upstream: str, extra: str = "") -> str:
        listen = f'listen = ["{host}:0"]'  # port 0 more than once needs distinct hosts
        return f'[environments.{name}]\n{listen}\nupstream = "{upstream}"\n{key_line}\n{extra}\n'

    return (
        "[server]\nwatch_config = false\nshutdown_timeout = 5\nmax_body_bytes = 65536\n"
        f'upstream_timeout = 0.5\nallowed_origins = ["{ORIGIN}"]\nlog_level = "debug"\n\n'
        + env("ok", "127.0.0.1", mock, 'rate_limit = { per_user = "1/minute" }')
        + env("rejected", "127.0.0.2", rejecting)
        + env("leaky", "127.0.0.3", leaky)
        + env("dead", "127.0.0.4", dead)
        + '[audit]\npath = "audit/audit.jsonl"\n'
    )


async def collect(
    session: aiohttp.ClientSession, captured: list[object], method: str, url: str, **kwargs: object
) -> tuple[int, bytes]:
    async with session.request(method, url, **kwargs) as r:  # type: ignore[arg-type]
        body = await r.read()
        captured.append(list(r.headers.items()))
        captured.append(body.decode("latin-1"))
        if r.headers.get("Content-Encoding") == "gzip":
            captured.append(gzip.decompress(body).decode("latin-1"))
        return r.status, body


async def test_nothing_captured_holds_the_key(
    logs, released, mock_upstream, raw_upstream, start_proxy, canary_env, tmp_path
):
    mock_url, _ = mock_upstream
    rejecting_app = create_mock_app(["sk-someone-else-entirely"], delay=0.1)
    leaky = await raw_upstream(leaky_app(released))
    body = multi_env_config(
        mock_url,
        await raw_upstream(rejecting_app),
        leaky,
        f"http://127.0.0.1:{free_port()}",
        'key = "env:SKYPROXY_TEST_KEY"',
    )
    proxy = await start_proxy(body, environment="ok")
    url = {name: f"http://{proxy.server.addresses(name)[0]}" for name in ("ok", "rejected", "leaky", "dead")}
    session, seen = proxy.session, []
    statuses: dict[str, int] = {}

    async def hit(label: str, method: str, address: str, **kwargs: object) -> bytes:
        status, answer = await collect(session, seen, method, address, **kwargs)
        statuses[label] = status
        return answer

    ok = url["ok"]
    create = {"model": "truefusion-pro", "input": {"prompt": "x"}}
    created = json.loads(await hit("create", "POST", f"{ok}/v1/predictions", json=create, headers=USER))
    pid = created["id"]
    await hit("poll", "GET", f"{ok}/v1/predictions/{pid}")
    await hit("cancel", "POST", f"{ok}/v1/predictions/{pid}/cancel")
    await hit("models", "GET", f"{ok}/v1/models", headers={"X-Api-Key": "sk-client", "Origin": ORIGIN})
    chat = {"model": "m", "stream": True}
    await hit("stream", "POST", f"{ok}/v1/chat/completions", json=chat, headers=USER)
    await hit("rate_limited", "POST", f"{ok}/v1/predictions", json=create, headers=USER)
    await hit("missing_user", "POST", f"{ok}/v1/predictions", json=create)
    await hit("not_found", "GET", f"{ok}/v2/x")
    await hit("too_large", "POST", f"{ok}/v1/echo", data=b"x" * 70_000)

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(8):
            yield b"y" * 16_384

    await hit("too_large_chunked", "POST", f"{ok}/v1/echo", data=chunks())
    await hit("host", "GET", f"{ok}/v1/models", headers={"Host": "evil.example:8787"})
    await hit("origin", "GET", f"{ok}/v1/models", headers={"Origin": "http://evil.example"})
    await hit("sec_fetch", "GET", f"{ok}/v1/models", headers={"Sec-Fetch-Site": "cross-site"})
    await hit("preflight", "OPTIONS", f"{ok}/v1/predictions", headers={"Origin": ORIGIN})
    await hit("upstream_401", "POST", f"{url['rejected']}/v1/predictions", json=create, headers=USER)
    await hit("echo_400", "POST", f"{url['leaky']}/v1/predictions", json=create, headers=USER)
    await hit("echo_gzip", "GET", f"{url['leaky']}/v1/gz", headers={"Accept-Encoding": "gzip"})
    await hit("echo_pieces", "GET", f"{url['leaky']}/v1/pieces")
    await hit("echo_401", "GET", f"{url['leaky']}/v1/unauthorized")
    await hit("timeout", "GET", f"{url['leaky']}/v1/slow")
    await hit("unreachable", "GET", f"{url['dead']}/v1/models")
    await hit("health", "GET", f"{ok}/-/health")
    await hit("metrics", "GET", f"{ok}/-/metrics")
    # A reload that fails because someone pasted the key itself into the config.
    write_config(tmp_path, multi_env_config(mock_url, mock_url, leaky, mock_url, f'key = "{CANARY}"'))
    await hit("reload", "POST", f"{ok}/-/reload")
    await hit("status", "GET", f"{ok}/-/status")

    assert statuses == {
        "create": 201,
        "poll": 200,
        "cancel": 200,
        "models": 200,
        "stream": 200,
        "rate_limited": 429,
        "missing_user": 400,
        "not_found": 404,
        "too_large": 413,
        "too_large_chunked": 413,
        "host": 403,
        "origin": 403,
        "sec_fetch": 403,
        "preflight": 204,
        "upstream_401": 401,
        "echo_400": 400,
        "echo_gzip": 403,
        "echo_pieces": 500,
        "echo_401": 401,
        "timeout": 504,
        "unreachable": 502,
        "health": 200,
        "metrics": 200,
        "reload": 409,
        "status": 200,
    }
    runtime = proxy.state.runtime
    envs = list(runtime.environments.values())
    objects = [
        runtime,
        runtime.settings,
        *envs,
        *(env.key for env in envs),
        *(str(env.key) for env in envs),
        *(f"{env.key}" for env in envs),
        proxy.state.last_reload_error,
        vars(proxy.state),
    ]
    await proxy.server.stop()  # flushes the audit trail
    files = {
        str(p): p.read_text(errors="replace")
        for p in tmp_path.rglob("*")
        if p.is_file() and not p.name.startswith("skyproxy.toml")
    }
    audit = files.get(str(tmp_path / "audit" / "audit.jsonl"), "")
    # The scan can only find what was captured: make sure the interesting parts were.
    assert "key rejected by upstream; revoked or rotated?" in logs.text
    assert FINGERPRINT in logs.text
    assert '"status":"created"' in audit.replace(" ", "") and FINGERPRINT in audit
    assert FINGERPRINT in "".join(str(x) for x in seen)
    assert "never the key itself" in str(proxy.state.last_reload_error)
    assert_no_canary(*seen, *records_text(logs), *files.values(), *objects)


def test_secret_shows_only_its_fingerprint():
    secret = Secret(CANARY)
    assert secret.reveal() == CANARY
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret]), repr({"k": secret})):
        assert FINGERPRINT in shown
        assert_no_canary(shown)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(secret)


@pytest.mark.parametrize(
    "raw",
    [
        f"{CANARY} {CANARY}",
        f"{CANARY}\x00",
        f"{CANARY}\nsecond-line",
        f"\t{CANARY}\x7f",
    ],
)
def test_key_source_errors_never_carry_the_key(raw, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(raw, encoding="utf-8")
    failures = []
    for spec, environ in (
        (KeySpec("env", "SKY_KEY"), {"SKY_KEY": raw}),
        (KeySpec("file", str(key_file)), {}),
        (KeySpec("credential", "key"), {"CREDENTIALS_DIRECTORY": str(tmp_path)}),
    ):
        with pytest.raises(KeySourceError) as caught:
            resolve("dev", spec, environ)
        failures.append(caught.value)
    texts = [t for e in failures for t in (str(e), repr(e), e.args, "".join(traceback.format_exception(e)))]
    assert all("whitespace or control characters" in str(e) for e in failures)
    assert_no_canary(*texts)


def test_key_pasted_into_the_config_is_not_echoed(tmp_path):
    body = (
        "[environments.dev]\n"
        'listen = ["127.0.0.1:0"]\nupstream = "https://api.skytells.ai"\n'
        f'key = "{CANARY}"\n'
    )
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.field == "environments.dev.key"
    assert_no_canary(str(caught.value), repr(caught.value), "".join(traceback.format_exception(caught.value)))


async def test_startup_failure_does_not_show_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYPROXY_TEST_KEY", f"{CANARY} trailing")
    body = (
        '[server]\nwatch_config = false\n[environments.dev]\nlisten = ["127.0.0.1:0"]\n'
        'upstream = "https://api.skytells.ai"\nkey = "env:SKYPROXY_TEST_KEY"\n'
        '[audit]\npath = "audit/audit.jsonl"\n'
    )
    settings = config.load(write_config(tmp_path, body))
    server = Supervisor(settings)
    with pytest.raises(StartupError) as caught:
        await server.start()
    assert "SKYPROXY_TEST_KEY" in str(caught.value)
    assert_no_canary(str(caught.value), repr(caught.value), repr(settings))


# -- a real daemon: its stderr and its command line ------------------------------------------


async def test_daemon_stderr_and_cmdline_hold_no_key(
    released, raw_upstream, run_daemon, tmp_path, canary_env
):
    upstream = await raw_upstream(leaky_app(released))
    port = free_port()
    body = (
        f'[server]\nwatch_config = false\nshutdown_timeout = 5\nupstream_timeout = 0.5\nlog_level = "debug"\n'
        f'[environments.dev]\nlisten = ["127.0.0.1:{port}"]\nupstream = "{upstream}"\n'
        'key = "env:SKYPROXY_TEST_KEY"\n[audit]\npath = "audit/audit.jsonl"\n'
    )
    path = write_config(tmp_path, body)
    daemon = await asyncio.to_thread(run_daemon, path, port, {"SKYPROXY_TEST_KEY": CANARY})
    cmdline = Path(f"/proc/{daemon.process.pid}/cmdline").read_bytes().decode(errors="replace")
    seen: list[object] = []
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        base = daemon.url
        statuses = [
            (await collect(session, seen, "GET", f"{base}/v1/unauthorized"))[0],
            (
                await collect(
                    session, seen, "POST", f"{base}/v1/predictions", json={"model": "m"}, headers=USER
                )
            )[0],
            (await collect(session, seen, "GET", f"{base}/v1/pieces"))[0],
            (await collect(session, seen, "GET", f"{base}/v1/slow"))[0],
            (await collect(session, seen, "GET", f"{base}/v1/x", headers={"Host": "evil.example"}))[0],
            (await collect(session, seen, "GET", f"{base}/-/status"))[0],
        ]
    assert statuses == [401, 400, 500, 504, 403, 200]
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait) == 0
    stderr = daemon.stderr()
    assert "key rejected by upstream; revoked or rotated?" in stderr and FINGERPRINT in stderr
    audit = (tmp_path / "audit" / "audit.jsonl").read_text()
    assert_no_canary(cmdline, stderr, audit, *seen)


async def test_daemon_refusing_a_pasted_key_does_not_print_it(run_daemon, tmp_path):
    port = free_port()
    body = (
        f'[environments.dev]\nlisten = ["127.0.0.1:{port}"]\nupstream = "https://api.skytells.ai"\n'
        f'key = "{CANARY}"\n'
    )
    daemon = run_daemon(write_config(tmp_path, body), port, wait=False)
    assert await asyncio.to_thread(daemon.wait) == 2
    stderr = daemon.stderr()
    assert "environments.dev.key" in stderr
    assert_no_canary(stderr)
