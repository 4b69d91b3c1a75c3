"""Shared fixtures: real servers on port 0, a canary key, a private Secret Service.

Nothing of skyproxy's own path is mocked. The upstream is the embedded mock served as a
real HTTP server, or a raw aiohttp app for odd behaviour.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import (
    CANARY,
    Daemon,
    Proxy,
    skyproxy_command,
    wait_for_secret_service,
    wait_healthy,
    write_config,
)
from helpers.raw_upstream import RawUpstream, Script

from skyproxy import config
from skyproxy.daemon.supervisor import Supervisor
from skyproxy.mock.app import MOCK_STATE, MockState, create_mock_app


@pytest.fixture
def canary_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SKYPROXY_TEST_KEY", CANARY)
    return CANARY


@pytest.fixture
async def mock_upstream() -> AsyncIterator[tuple[str, MockState]]:
    """The embedded mock, as a real server on an ephemeral port, accepting the canary."""
    app = create_mock_app([CANARY], delay=0.3)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), app[MOCK_STATE]
    finally:
        await server.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[web.Application], object]]:
    """Starts raw aiohttp apps for odd upstream behaviour; returns their base URLs."""
    servers: list[TestServer] = []

    async def start(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Script], Awaitable[RawUpstream]]]:
    """Starts raw socket upstreams that control every byte; list it before start_proxy so
    the proxies stop first."""
    started: list[RawUpstream] = []

    async def start(script: Script) -> RawUpstream:
        upstream = RawUpstream(script)
        await upstream.start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.stop()


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    """Starts skyproxy in process from config text; every proxy is stopped at the end."""
    started: list[Proxy] = []

    async def start(body: str, environment: str = "dev") -> Proxy:
        path = write_config(tmp_path, body)
        settings = config.load(path)
        server = Supervisor(settings)
        await server.start()
        address = server.addresses(environment)[0]
        session = aiohttp.ClientSession(auto_decompress=False)
        proxy = Proxy(server, f"http://{address}", session, settings.audit.path)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.session.close()
        await proxy.server.stop()


@pytest.fixture
def run_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def start(config_path: Path, port: int, env: dict[str, str] | None = None, wait: bool = True) -> Daemon:
        full_env = {**os.environ, "SKYPROXY_TEST_KEY": CANARY, **(env or {})}
        if "NOTIFY_SOCKET" not in (env or {}):
            full_env.pop("NOTIFY_SOCKET", None)  # a CI under systemd must not get our READY=1
        stderr_path = tmp_path / f"daemon-{len(daemons)}.stderr"
        with stderr_path.open("wb") as err:
            process = subprocess.Popen(
                [*skyproxy_command(), "serve", "-c", str(config_path)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=full_env,
            )
        daemon = Daemon(process, f"http://127.0.0.1:{port}", config_path, stderr_path, full_env)
        daemons.append(daemon)
        if wait:
            wait_healthy(daemon)
        return daemon

    yield start
    for daemon in daemons:
        if daemon.process.poll() is None:
            daemon.process.kill()
        daemon.process.wait(10)


# -- the real keyring: a private D-Bus session with gnome-keyring's Secret Service ----------


@pytest.fixture(scope="session")
def secret_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A private session bus and an unlocked gnome-keyring, never the developer's own.

    Yields the environment variables that point keyring (in process and in subprocesses)
    at it. Skips where gnome-keyring is not installed, except in CI, where that fails.
    """
    missing = [tool for tool in ("dbus-daemon", "gnome-keyring-daemon") if not shutil.which(tool)]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install {missing} (see .ci/run)")
        pytest.skip(f"needs {missing}: apt-get install dbus gnome-keyring")
    home = tmp_path_factory.mktemp("keyring-home")
    bus = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(home)},
    )
    assert bus.stdout is not None
    address = bus.stdout.readline().decode().strip()
    bus.stdout.close()
    env = {
        "DBUS_SESSION_BUS_ADDRESS": address,
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / ".local/share"),
        "XDG_STATE_HOME": str(home / ".local/state"),
        "PYTHON_KEYRING_BACKEND": "keyring.backends.SecretService.Keyring",
    }
    keyring_daemon = subprocess.Popen(
        ["gnome-keyring-daemon", "--foreground", "--unlock", "--components=secrets"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    assert keyring_daemon.stdin is not None
    keyring_daemon.stdin.write(b"skyproxy-test-keyring")
    keyring_daemon.stdin.close()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    wait_for_secret_service()
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for process in (keyring_daemon, bus):
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)


@pytest.fixture
def spawn(run_daemon: Callable[..., Daemon]) -> Callable[..., Daemon]:
    """`skyproxy serve -c FILE` as a subprocess, with the canary key in its environment."""
    return run_daemon
