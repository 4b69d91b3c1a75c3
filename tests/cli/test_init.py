"""`skyproxy init` as a user runs it: flags from a script, and questions on a real terminal.

The upstream that verifies the keys is the embedded mock on an ephemeral port, accepting
only the keys the test hands it; the keyring is the private Secret Service.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import stat
import subprocess
import termios
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from helpers import CANARY, VENV_BIN, assert_no_canary

from skyproxy import config
from skyproxy.keys.secret import fingerprint
from skyproxy.keys.store import SERVICE
from skyproxy.mock.app import create_mock_app

SKYPROXY = str(VENV_BIN / "skyproxy")
PROD_KEY = "sk-prod-" + "1c9f3a7e5b2d4f60a8e1"


@pytest.fixture
async def verifier() -> AsyncIterator[str]:
    server = TestServer(create_mock_app([CANARY, PROD_KEY]), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.fixture
def keyring_env(secret_service: dict[str, str]) -> Iterator[dict[str, str]]:
    import keyring
    import keyring.errors

    def clean() -> None:
        for name in ("dev", "production", "staging"):
            with contextlib.suppress(keyring.errors.PasswordDeleteError):
                keyring.delete_password(SERVICE, name)

    clean()
    yield secret_service
    clean()


def init(*args: str, env: dict[str, str], stdin: str = "", cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SKYPROXY, "init", *args],
        env={**os.environ, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


async def test_init_from_flags_verifies_stores_writes_and_checks(
    tmp_path: Path, verifier: str, keyring_env: dict[str, str]
) -> None:
    result = await _in_thread(
        init,
        "--upstream",
        verifier,
        "--stdin",
        env=keyring_env,
        stdin=f"{CANARY}\n{PROD_KEY}\n",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert_no_canary(result.stdout, result.stderr)
    assert PROD_KEY not in result.stdout + result.stderr
    settings = config.load(tmp_path / "skyproxy.toml")
    assert list(settings.environments) == ["dev", "production"]
    assert [str(env.listen[0]) for env in settings.environments.values()] == [
        "127.0.0.1:8787",
        "127.0.0.1:8788",
    ]
    assert all(
        env.key.kind == "keyring" and env.upstream == verifier for env in settings.environments.values()
    )
    assert f"the upstream accepted key {fingerprint(CANARY)}" in result.stdout
    assert ": valid" in result.stdout  # check ran on what was written
    assert 'base_url="http://127.0.0.1:8787/v1"' in result.stdout
    import keyring

    assert keyring.get_password(SERVICE, "production") == PROD_KEY


async def test_a_key_the_upstream_refuses_changes_nothing(
    tmp_path: Path, verifier: str, keyring_env: dict[str, str]
) -> None:
    result = await _in_thread(
        init,
        "--upstream",
        verifier,
        "--environments",
        "staging",
        "--stdin",
        env=keyring_env,
        stdin="sk-wrong-0000000000000000\n",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "refused the new key" in result.stderr
    assert not (tmp_path / "skyproxy.toml").exists()
    import keyring

    assert keyring.get_password(SERVICE, "staging") is None


async def test_file_keys_are_private_and_an_existing_config_is_kept(tmp_path: Path, verifier: str) -> None:
    args = ("--upstream", verifier, "--environments", "dev", "--key-source", "file", "--stdin")
    args += ("--keys-dir", str(tmp_path / "keys"))
    first = await _in_thread(init, *args, env={}, stdin=f"{CANARY}\n", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    key_file = tmp_path / "keys" / "dev"
    assert key_file.read_text().strip() == CANARY
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert config.load(tmp_path / "skyproxy.toml").environments["dev"].key.kind == "file"
    before = (tmp_path / "skyproxy.toml").read_text()
    again = await _in_thread(init, *args, env={}, stdin=f"{CANARY}\n", cwd=tmp_path)
    assert again.returncode == 1 and "--force" in again.stderr
    assert (tmp_path / "skyproxy.toml").read_text() == before
    forced = await _in_thread(
        init, *args, "--port", "9900", "--force", env={}, stdin=f"{CANARY}\n", cwd=tmp_path
    )
    assert forced.returncode == 0
    assert '"127.0.0.1:9900"' in (tmp_path / "skyproxy.toml").read_text()


async def test_init_asks_on_a_terminal_and_hides_the_key(
    tmp_path: Path, verifier: str, keyring_env: dict[str, str]
) -> None:
    answers = [
        ("Environments [dev,production]:", "dev"),
        ("Skytells API URL [https://api.skytells.ai]:", verifier),
        ("Keep keys in (keyring | file | credential) [keyring]:", "keyring"),
        ("Skytells API key for dev (input hidden):", CANARY),
        ("Install and start the systemd user unit? [y/N]:", "n"),
    ]
    transcript, code = await _in_thread(_converse, [SKYPROXY, "init"], answers, keyring_env, tmp_path)
    assert code == 0, transcript
    assert_no_canary(transcript)  # typed, never echoed
    assert list(config.load(tmp_path / "skyproxy.toml").environments) == ["dev"]


def test_the_user_unit_points_at_this_skyproxy_and_config(tmp_path: Path) -> None:
    from skyproxy.cli.init import install_user_unit

    unit = install_user_unit(tmp_path / "skyproxy.toml", home=tmp_path)
    text = unit.read_text()
    assert unit == tmp_path / ".config/systemd/user/skyproxy.service"
    assert f"serve -c {tmp_path / 'skyproxy.toml'}" in text
    assert "ExecStart=%h/.local/bin" not in text
    assert "Type=notify" in text


# -- helpers ---------------------------------------------------------------------------------


async def _in_thread(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    import asyncio

    return await asyncio.to_thread(fn, *args, **kwargs)


def _converse(
    command: list[str], answers: list[tuple[str, str]], env: dict[str, str], cwd: Path
) -> tuple[str, int]:
    """Runs `command` on a real pseudo-terminal, answering each prompt as it appears."""
    primary, secondary = pty.openpty()

    def controlling_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # getpass reads /dev/tty: it must be this one

    process = subprocess.Popen(
        command,
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env={**os.environ, **env},
        cwd=cwd,
        start_new_session=True,
        preexec_fn=controlling_terminal,
    )
    os.close(secondary)
    seen = b""
    try:
        for prompt, answer in answers:
            seen = _read_until(primary, seen, prompt.encode())
            os.write(primary, answer.encode() + b"\n")
        code = process.wait(60)
        seen = _read_until(primary, seen, None)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        os.close(primary)
    return seen.decode(errors="replace"), code


def _read_until(fd: int, seen: bytes, wanted: bytes | None, deadline_s: float = 60.0) -> bytes:
    deadline = time.monotonic() + deadline_s
    while wanted is None or wanted not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            if wanted is None:
                return seen
            raise AssertionError(f"no prompt {wanted!r} in {seen!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the terminal closed: the process is gone
            if wanted is None:
                return seen
            raise AssertionError(f"no prompt {wanted!r} in {seen!r}") from None
        if not chunk:
            return seen
        seen += chunk
    cut = seen.index(wanted) + len(wanted)
    return seen[cut:] if wanted is not None else seen
