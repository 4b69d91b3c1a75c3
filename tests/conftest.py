"""Shared fixtures: real servers on port 0, a canary key, a private Secret Service.

Nothing of skyproxy's own path is mocked. The upstream is the embedded mock served as a
real HTTP server, or a raw aiohttp app for odd behaviour.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from skyproxy import config
from skyproxy.daemon.supervisor import Server
from skyproxy.mock.app import MOCK_STATE, MockState, create_mock_app

# A key that must never appear in anything a test captures: responses, logs, files.
CANARY = "sk-canary-" + "7f3e9b2c4d1a8e6f5b0c9d2e"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(folder: Path, body: str, name: str = "skyproxy.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body).lstrip(), encoding="utf-8")
    return path


def env_config(
    upstream: str,
    *,
    key: str = 'key = "env:SKYPROXY_TEST_KEY"',
    listen: str = "127.0.0.1:0",
    extra: str = "",
    rules: str = "",
    server: str = "",
    env_extra: str = "",
) -> str:
    """A one-environment config; `extra` adds whole tables."""
    return (
        f"[server]\nwatch_config = false\nshutdown_timeout = 5\n{server}\n"
        f'[environments.dev]\nlisten = ["{listen}"]\nupstream = "{upstream}"\n{key}\n{env_extra}\n'
        f"{rules}\n"
        f'[audit]\npath = "audit/audit.jsonl"\n{extra}\n'
    )


@dataclass
class Proxy:
    server: Server
    url: str
    session: aiohttp.ClientSession
    audit_path: Path

    @property
    def state(self):  # type: ignore[no-untyped-def]
        assert self.server.state is not None
        return self.server.state


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
async def start_proxy(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    """Starts skyproxy in process from config text; every proxy is stopped at the end."""
    started: list[Proxy] = []

    async def start(body: str, environment: str = "dev") -> Proxy:
        path = write_config(tmp_path, body)
        settings = config.load(path)
        server = Server(settings)
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


@dataclass
class Daemon:
    """skyproxy serve as a real subprocess, for signals and exit codes."""

    process: subprocess.Popen[bytes]
    url: str
    config: Path
    stderr_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)


def skyproxy_command() -> list[str]:
    script = VENV_BIN / "skyproxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "skyproxy"]


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


def wait_healthy(daemon: Daemon, deadline_s: float = 20.0) -> None:
    import urllib.request

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise AssertionError(f"daemon exited {daemon.process.returncode}: {daemon.stderr()}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{daemon.url}/-/health", timeout=1) as answer,
        ):
            if answer.status == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"daemon not healthy in {deadline_s}s: {daemon.stderr()}")


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
    _wait_for_secret_service()
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


def _wait_for_secret_service() -> None:
    import keyring
    from keyring.backends import SecretService

    keyring.set_keyring(SecretService.Keyring())
    deadline = time.monotonic() + 10
    while True:
        try:
            keyring.set_password("skyproxy-selftest", "probe", "ok")
            keyring.delete_password("skyproxy-selftest", "probe")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def assert_no_canary(*captured: object) -> None:
    for item in captured:
        text = item if isinstance(item, str) else repr(item)
        assert CANARY not in text, "the key leaked"
        assert CANARY[-12:] not in text, "part of the key leaked"
