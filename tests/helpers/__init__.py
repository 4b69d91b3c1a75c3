"""What tests share: the canary key, config builders, free ports, daemons and leak scans.

Fixtures live in `tests/conftest.py`; plain helpers live here, so no test module ever
imports another.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

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
    server: Any  # skyproxy.daemon.supervisor.Supervisor
    url: str
    session: aiohttp.ClientSession
    audit_path: Path

    @property
    def state(self):  # type: ignore[no-untyped-def]
        assert self.server.state is not None
        return self.server.state


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


def wait_for_secret_service() -> None:
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
