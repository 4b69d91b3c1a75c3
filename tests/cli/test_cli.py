"""The `skyproxy` console script as a user runs it: real subprocesses, exit codes, output."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import CANARY, VENV_BIN, assert_no_canary, free_port, write_config

from skyproxy import __version__
from skyproxy.keys.secret import fingerprint
from skyproxy.keys.store import SERVICE

SKYPROXY = str(VENV_BIN / "skyproxy")
OTHER = "sk-other-" + "0a1b2c3d4e5f60718293"


def run(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str = "",
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SKYPROXY, *args],
        env={**os.environ, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def rows(stdout: str) -> dict[str, list[str]]:
    """A printed table's rows by first column (cells are separated by 2+ spaces)."""
    import re

    table: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        if line.startswith((" ", "config ")) or not line.strip():
            continue
        cells = re.split(r"\s{2,}", line.strip())
        table[cells[0]] = cells
    return table


# -- version ---------------------------------------------------------------------------------


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"skyproxy {__version__}"


def test_python_dash_m_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "skyproxy", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"skyproxy {__version__}"


def test_no_command_prints_help_and_fails() -> None:
    result = run()
    assert result.returncode == 2
    assert "serve" in result.stdout and "check" in result.stdout and "key" in result.stdout


# -- check -----------------------------------------------------------------------------------

THREE = """\
    [environments.dev]
    listen = ["127.0.0.1:18701"]
    upstream = "http://127.0.0.1:9"
    key = "env:SKY_DEV"

    [environments.playground]
    listen = ["127.0.0.1:18702", "[::1]:18702"]
    upstream = "mock"

    [environments.prod]
    listen = ["127.0.0.1:18703"]
    key = "env:SKY_PROD"

    [audit]
    path = "audit/audit.jsonl"
"""


def test_check_valid_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, THREE)
    result = run("check", "-c", str(path), env={"SKY_DEV": CANARY, "SKY_PROD": OTHER})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"config {path.resolve()}: valid" in result.stdout
    table = rows(result.stdout)
    assert table["ENVIRONMENT"] == [
        "ENVIRONMENT",
        "LISTEN",
        "UPSTREAM",
        "KEY SOURCE",
        "FINGERPRINT",
        "STATUS",
    ]
    assert table["dev"] == [
        "dev",
        "127.0.0.1:18701",
        "http://127.0.0.1:9",
        "env:SKY_DEV",
        fingerprint(CANARY),
        "ok",
    ]
    assert table["prod"] == [
        "prod",
        "127.0.0.1:18703",
        "https://api.skytells.ai",
        "env:SKY_PROD",
        fingerprint(OTHER),
        "ok",
    ]
    assert table["playground"][:4] == [
        "playground",
        "127.0.0.1:18702,[::1]:18702",
        "mock",
        "generated (mock)",
    ]
    # A mock's key is made afresh by each process: a fingerprint here would not be the daemon's.
    assert table["playground"][-2:] == ["-", "ok (a new key each start)"]
    assert set(table) == {"ENVIRONMENT", "dev", "playground", "prod"}
    assert_no_canary(result.stdout, result.stderr)
    assert OTHER not in result.stdout + result.stderr


def test_check_unresolvable_key_exits_1(tmp_path: Path) -> None:
    path = write_config(tmp_path, THREE)
    result = run("check", "-c", str(path), env={"SKY_DEV": CANARY, "SKY_PROD": ""})
    assert result.returncode == 1, result.stdout + result.stderr
    table = rows(result.stdout)
    assert table["dev"][-1] == "ok"
    assert table["prod"][-2:] == ["-", "error"]
    assert "prod: environment variable $SKY_PROD is not set; run: export SKY_PROD=" in result.stdout
    assert_no_canary(result.stdout, result.stderr)


def test_check_invalid_config_exits_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, THREE.replace('"127.0.0.1:18703"', '"18703"'))
    result = run("check", "-c", str(path), env={"SKY_DEV": CANARY, "SKY_PROD": OTHER})
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"{path.resolve()}:11: environments.prod.listen[0]" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_warns_about_an_old_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, THREE + "[keys]\nmax_age_days = 30\n")
    (tmp_path / "audit").mkdir()
    state = {"keys": {"dev": {"fingerprint": fingerprint(CANARY), "set_at": "2020-01-01T00:00:00+00:00"}}}
    (tmp_path / "audit" / "keys.json").write_text(json.dumps(state))
    result = run("check", "-c", str(path), env={"SKY_DEV": CANARY, "SKY_PROD": OTHER})
    assert result.returncode == 0
    status = rows(result.stdout)["dev"][-1]
    assert "days old" in status and "rotate" in status


def test_key_list_reports_an_old_key_as_check_does(tmp_path: Path) -> None:
    path = write_config(tmp_path, THREE + "[keys]\nmax_age_days = 30\n")
    (tmp_path / "audit").mkdir()
    state = {"keys": {"dev": {"fingerprint": fingerprint(CANARY), "set_at": "2020-01-01T00:00:00+00:00"}}}
    (tmp_path / "audit" / "keys.json").write_text(json.dumps(state))
    env = {"SKY_DEV": CANARY, "SKY_PROD": OTHER}
    listed = run("key", "list", "-c", str(path), env=env)
    checked = run("check", "-c", str(path), env=env)
    assert listed.returncode == checked.returncode == 0, listed.stderr + checked.stderr
    dev = rows(listed.stdout)["dev"]
    assert dev[:3] == ["dev", "env:SKY_DEV", fingerprint(CANARY)]
    assert dev[3].endswith("d") and int(dev[3][:-1]) > 30
    assert dev[4] == rows(checked.stdout)["dev"][-1] == f"ok (key {dev[3][:-1]} days old: rotate)"
    assert rows(listed.stdout)["prod"][3:] == ["-", "ok"]  # never recorded: age unknown
    assert rows(listed.stdout)["playground"][2:] == ["-", "-", "ok (a new key each start)"]
    assert_no_canary(listed.stdout, listed.stderr)


# -- serve refuses to start half-configured ---------------------------------------------------


def test_serve_with_a_missing_key_exits_without_binding(tmp_path: Path) -> None:
    good, bad = free_port(), free_port()
    body = f"""\
        [environments.dev]
        listen = ["127.0.0.1:{good}"]
        upstream = "mock"

        [environments.prod]
        listen = ["127.0.0.1:{bad}"]
        upstream = "http://127.0.0.1:9"
        key = "keyring:skyproxy-test-never-stored"

        [audit]
        path = "audit/audit.jsonl"
    """
    path = write_config(tmp_path, body)
    env = {**os.environ, "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring"}

    connected: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            for port in (good, bad):
                with socket.socket() as s:
                    s.settimeout(0.2)
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        connected.append(port)
            stop.wait(0.005)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        result = subprocess.run(
            [SKYPROXY, "serve", "-c", str(path)], env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        stop.set()
        prober.join()
    assert result.returncode == 1, result.stderr
    assert "cannot start" in result.stderr
    assert "environment 'prod'" in result.stderr
    assert "key source 'keyring:skyproxy-test-never-stored'" in result.stderr
    assert "run: skyproxy key set skyproxy-test-never-stored" in result.stderr
    assert "Traceback" not in result.stderr
    assert connected == [], "a listener was bound before every key was resolved"
    assert not (tmp_path / "audit" / "audit.jsonl").exists()


def test_serve_invalid_config_exits_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[environments.dev]\nlisten = ["127.0.0.1:x"]\nupstream = "mock"\n')
    result = run("serve", "-c", str(path))
    assert result.returncode == 2
    assert 'environments.dev.listen[0]: expected "host:port", got "127.0.0.1:x"' in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_port_taken_exits_non_zero(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(
            tmp_path, f'[environments.dev]\nlisten = ["127.0.0.1:{port}"]\nupstream = "mock"\n'
        )
        result = run("serve", "-c", str(path))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "is another skyproxy running?" in result.stderr
    assert "Traceback" not in result.stderr


# -- key commands (a real Secret Service) ----------------------------------------------------


@pytest.fixture
def keyring_env(secret_service: dict[str, str]) -> Iterator[dict[str, str]]:
    import keyring
    import keyring.errors

    def clean() -> None:
        for name in ("dev", "dev@previous", "prod", "dev-user"):
            with contextlib.suppress(keyring.errors.PasswordDeleteError):
                keyring.delete_password(SERVICE, name)

    clean()
    yield secret_service
    clean()


KEYRING_CONFIG = """\
    [environments.dev]
    listen = ["127.0.0.1:18711"]
    upstream = "http://127.0.0.1:9"
    key = "keyring"

    [environments.prod]
    listen = ["127.0.0.1:18712"]
    upstream = "http://127.0.0.1:9"
    key = "keyring"

    [audit]
    path = "audit/audit.jsonl"
"""


def test_key_set_show_list_delete(tmp_path: Path, keyring_env: dict[str, str]) -> None:
    import keyring

    path = write_config(tmp_path, KEYRING_CONFIG)
    fp = fingerprint(CANARY)

    result = run("key", "set", "dev", "--stdin", "-c", str(path), env=keyring_env, stdin=CANARY + "\n")
    assert result.returncode == 0, result.stderr
    assert fp in result.stdout
    assert keyring.get_password(SERVICE, "dev") == CANARY
    state = json.loads((tmp_path / "audit" / "keys.json").read_text())
    assert state["keys"]["dev"]["fingerprint"] == fp

    shown = run("key", "show", "dev", "-c", str(path), env=keyring_env)
    assert shown.returncode == 0, shown.stderr
    table = rows(shown.stdout)
    assert table["ENVIRONMENT"] == ["ENVIRONMENT", "SOURCE", "FINGERPRINT", "AGE", "STATUS"]
    assert table["dev"] == ["dev", "keyring", fp, "0d", "ok"]
    assert "prod" not in table

    listed = run("key", "list", "-c", str(path), env=keyring_env)
    assert listed.returncode == 1  # prod has no key yet
    table = rows(listed.stdout)
    assert table["dev"] == ["dev", "keyring", fp, "0d", "ok"]
    assert table["prod"][:4] == ["prod", "keyring", "-", "-"]
    assert "no key stored" in table["prod"][4] and "skyproxy key set prod" in table["prod"][4]

    deleted = run("key", "delete", "dev", "-c", str(path), env=keyring_env)
    assert deleted.returncode == 0, deleted.stderr
    assert keyring.get_password(SERVICE, "dev") is None
    assert "dev" not in json.loads((tmp_path / "audit" / "keys.json").read_text())["keys"]
    again = run("key", "delete", "dev", "-c", str(path), env=keyring_env)
    assert again.returncode == 1
    assert "no key stored for dev" in again.stderr

    shown = run("key", "show", "dev", "-c", str(path), env=keyring_env)
    assert shown.returncode == 1
    assert rows(shown.stdout)["dev"][2] == "-"

    for done in (result, shown, listed, deleted, again):
        assert_no_canary(done.stdout, done.stderr)


def test_key_set_uses_the_configured_keyring_username(tmp_path: Path, keyring_env: dict[str, str]) -> None:
    import keyring

    path = write_config(tmp_path, KEYRING_CONFIG.replace('key = "keyring"', 'key = "keyring:dev-user"', 1))
    result = run("key", "set", "dev", "--stdin", "-c", str(path), env=keyring_env, stdin=CANARY)
    assert result.returncode == 0, result.stderr
    assert keyring.get_password(SERVICE, "dev-user") == CANARY
    assert keyring.get_password(SERVICE, "dev") is None
    checked = run("check", "-c", str(path), env=keyring_env)
    assert rows(checked.stdout)["dev"][-2:] == [fingerprint(CANARY), "ok"]
    assert_no_canary(result.stdout, result.stderr, checked.stdout, checked.stderr)


def test_key_set_without_a_config_file(tmp_path: Path, keyring_env: dict[str, str]) -> None:
    import keyring

    env = {**keyring_env, "XDG_STATE_HOME": str(tmp_path / "state"), "SKYPROXY_CONFIG": ""}
    result = run("key", "set", "dev", "--stdin", env=env, stdin=CANARY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert keyring.get_password(SERVICE, "dev") == CANARY
    state = json.loads((tmp_path / "state" / "skyproxy" / "keys.json").read_text())
    assert state["keys"]["dev"]["fingerprint"] == fingerprint(CANARY)


@pytest.mark.parametrize("bad", ["", "\n", "sk-has space-1234\n", "sk-tab\there\n"])
def test_key_set_refuses_empty_or_whitespace(tmp_path: Path, keyring_env: dict[str, str], bad: str) -> None:
    import keyring

    path = write_config(tmp_path, KEYRING_CONFIG)
    result = run("key", "set", "dev", "--stdin", "-c", str(path), env=keyring_env, stdin=bad)
    assert result.returncode == 1
    assert "empty or contains whitespace" in result.stderr
    assert keyring.get_password(SERVICE, "dev") is None


@pytest.mark.parametrize(
    "argv",
    [
        ["key", "set", "dev", CANARY],
        ["key", "set", "dev", "--key", CANARY],
        ["key", "set", "dev", f"--key={CANARY}"],
        ["key", "rotate", "dev", CANARY],
    ],
)
def test_key_is_never_read_from_argv(tmp_path: Path, keyring_env: dict[str, str], argv: list[str]) -> None:
    import keyring

    path = write_config(tmp_path, KEYRING_CONFIG)
    result = run(*argv, "-c", str(path), env=keyring_env, stdin="")
    assert result.returncode == 2
    assert "keys are never taken from the command line" in result.stderr
    assert keyring.get_password(SERVICE, "dev") is None
    assert_no_canary(result.stdout, result.stderr)


@pytest.mark.parametrize("action", ["set", "rotate"])
def test_key_commands_offer_no_option_for_the_key(action: str) -> None:
    result = run("key", action, "--help")
    assert result.returncode == 0
    options = {word.strip(",[]()") for word in result.stdout.split() if word.startswith(("-", "[-", "(-"))}
    allowed = {"-h", "--help", "--stdin", "-c", "--config", "CONFIG", "--timeout", "TIMEOUT"}
    assert options <= allowed, options


@pytest.mark.parametrize("action", [["rotate", "dev", "--stdin"], ["rollback", "dev"]])
def test_rotation_without_a_config_says_it_needs_one(tmp_path: Path, action: list[str]) -> None:
    if Path("/etc/skyproxy/skyproxy.toml").exists():
        pytest.skip("this machine has a system-wide config")
    env = {
        "HOME": str(tmp_path),
        "SKYPROXY_CONFIG": "",
        "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
    }
    result = run("key", *action, env=env, stdin=CANARY + "\n", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == "skyproxy: rotation needs the config (-c FILE) to find the upstream and daemon\n"
    assert_no_canary(result.stdout, result.stderr)


def test_check_notes_a_listen_port_already_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(
            tmp_path, f'[environments.dev]\nlisten = ["127.0.0.1:{port}"]\nupstream = "mock"\n'
        )
        busy = run("check", "-c", str(path))
    free = run("check", "-c", str(path))
    assert busy.returncode == 0, busy.stderr  # valid; the note is for the operator
    assert f"dev: 127.0.0.1:{port} is already in use (is skyproxy already running?" in busy.stdout
    assert free.returncode == 0 and "in use" not in free.stdout


# -- the rough edges a newcomer hit ----------------------------------------------------------


def test_key_set_without_a_terminal_reads_the_piped_key(tmp_path: Path, keyring_env: dict[str, str]) -> None:
    path = write_config(tmp_path, KEYRING_CONFIG)
    result = run("key", "set", "dev", "-c", str(path), env=keyring_env, stdin=CANARY + "\n")
    assert result.returncode == 0, result.stderr
    assert "GetPassWarning" not in result.stderr and "Traceback" not in result.stderr
    assert fingerprint(CANARY) in result.stdout
    assert_no_canary(result.stdout, result.stderr)


def test_key_set_refuses_an_environment_the_config_does_not_have(
    tmp_path: Path, keyring_env: dict[str, str]
) -> None:
    path = write_config(tmp_path, KEYRING_CONFIG)
    result = run("key", "set", "production", "-c", str(path), "--stdin", env=keyring_env, stdin=CANARY + "\n")
    assert result.returncode == 1
    assert "no environment 'production'" in result.stderr and "dev, prod" in result.stderr
    shown = run("key", "show", "production", "-c", str(path), env=keyring_env)
    assert "ok" not in shown.stdout.splitlines()[-1]


def test_key_set_for_a_mock_environment_says_how_to_use_a_real_key(
    tmp_path: Path, keyring_env: dict[str, str]
) -> None:
    path = write_config(tmp_path, '[environments.dev]\nlisten = ["127.0.0.1:18713"]\nupstream = "mock"\n')
    result = run("key", "set", "dev", "-c", str(path), "--stdin", env=keyring_env, stdin=CANARY + "\n")
    assert result.returncode == 1
    assert "embedded mock" in result.stderr and "skyproxy init" in result.stderr
    assert_no_canary(result.stdout, result.stderr)


def test_key_list_without_any_config_says_so(tmp_path: Path) -> None:
    result = run("key", "list", cwd=tmp_path, env={"HOME": str(tmp_path), "SKYPROXY_CONFIG": ""})
    assert result.returncode == 1
    assert "no config found" in result.stderr


@pytest.mark.parametrize("group", [["key", "set"], ["key", "list"], ["audit", "summary"], ["check"]])
def test_every_config_option_has_help(group: list[str]) -> None:
    result = run(*group, "-h")
    assert "config file (default: $SKYPROXY_CONFIG" in " ".join(result.stdout.split())


def test_audit_summary_names_a_bad_since_once(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[environments.dev]\nlisten = ["127.0.0.1:0"]\nupstream = "mock"\n')
    result = run("audit", "summary", "-c", str(path), "--since", "yesterday")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "skyproxy: --since: 'yesterday' is neither a duration such as 30m, 1h, 1d or 2w, "
        "nor an ISO 8601 time such as 2026-11-25T10:00:00Z"
    )
