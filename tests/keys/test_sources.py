"""Key sources: real files, a real Secret Service, real subprocesses."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import CANARY, assert_no_canary, skyproxy_command, write_config

from skyproxy.config import KeySpec
from skyproxy.errors import KeySourceError
from skyproxy.keys.secret import fingerprint
from skyproxy.keys.sources import resolve
from skyproxy.keys.store import SERVICE

# -- env: ------------------------------------------------------------------------------------


def test_env_source() -> None:
    key = resolve("dev", KeySpec("env", "SKY_DEV"), {"SKY_DEV": CANARY + "\n"})
    assert key.reveal() == CANARY


def test_env_source_missing_names_environment_source_and_fix() -> None:
    with pytest.raises(KeySourceError) as caught:
        resolve("dev", KeySpec("env", "SKY_DEV"), {})
    text = str(caught.value)
    assert "'dev'" in text and "env:SKY_DEV" in text and "$SKY_DEV is not set" in text
    assert "export SKY_DEV=" in caught.value.fix


# -- file: -----------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [CANARY, CANARY + "\n", f"  {CANARY}\r\n\n", f"\t{CANARY} \n"])
def test_file_source_strips_surrounding_whitespace(tmp_path: Path, content: str) -> None:
    path = tmp_path / "dev.key"
    path.write_text(content)
    assert resolve("dev", KeySpec("file", str(path)), {}).reveal() == CANARY


def test_file_source_missing(tmp_path: Path) -> None:
    path = tmp_path / "missing.key"
    with pytest.raises(KeySourceError) as caught:
        resolve("dev", KeySpec("file", str(path)), {})
    assert "file not found" in str(caught.value)
    assert f"file:{path}" in str(caught.value)
    assert str(path) in caught.value.fix


def test_file_source_empty(tmp_path: Path) -> None:
    path = tmp_path / "dev.key"
    path.write_text("\n  \n")
    with pytest.raises(KeySourceError, match="the key is empty"):
        resolve("dev", KeySpec("file", str(path)), {})


@pytest.mark.parametrize(
    "bad", ["sk-live abc-123456", "sk-live\tabc123456", "sk-live\nabc123456", "sk-\x00abc12"]
)
def test_key_with_inner_whitespace_or_controls_is_refused(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "dev.key"
    path.write_text(bad + "\n")
    with pytest.raises(KeySourceError) as caught:
        resolve("dev", KeySpec("file", str(path)), {})
    assert "whitespace or control characters" in str(caught.value)
    assert "abc12" not in str(caught.value)
    with pytest.raises(KeySourceError):
        resolve("dev", KeySpec("env", "K"), {"K": bad})


def test_file_source_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "dev.key"
    path.mkdir()  # a folder: read fails even as root
    with pytest.raises(KeySourceError, match="cannot read"):
        resolve("dev", KeySpec("file", str(path)), {})


# -- credential: -----------------------------------------------------------------------------


def test_credential_source(tmp_path: Path) -> None:
    (tmp_path / "dev").write_text(CANARY + "\n")
    key = resolve("dev", KeySpec("credential", "dev"), {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert key.reveal() == CANARY


def test_credential_without_credentials_directory() -> None:
    with pytest.raises(KeySourceError) as caught:
        resolve("dev", KeySpec("credential", "dev"), {})
    assert "$CREDENTIALS_DIRECTORY is not set" in str(caught.value)
    assert "LoadCredential=dev:" in caught.value.fix


def test_credential_missing_from_the_directory(tmp_path: Path) -> None:
    with pytest.raises(KeySourceError) as caught:
        resolve("prod", KeySpec("credential", "prod-key"), {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    text = str(caught.value)
    assert "'prod'" in text and "credential:prod-key" in text and "no credential 'prod-key'" in text


# -- keyring (a real Secret Service) ---------------------------------------------------------


@pytest.fixture
def keyring_clean(secret_service: dict[str, str]) -> Iterator[dict[str, str]]:
    import keyring
    import keyring.errors

    names = ("dev", "keys-test-user")

    def clean() -> None:
        for name in names:
            with contextlib.suppress(keyring.errors.PasswordDeleteError):
                keyring.delete_password(SERVICE, name)

    clean()
    yield secret_service
    clean()


def test_keyring_source(keyring_clean: dict[str, str]) -> None:
    import keyring

    keyring.set_password(SERVICE, "dev", CANARY)
    assert resolve("dev", KeySpec("keyring"), {}).reveal() == CANARY
    keyring.set_password(SERVICE, "keys-test-user", "sk-other-1234")
    assert resolve("dev", KeySpec("keyring", "keys-test-user"), {}).reveal() == "sk-other-1234"


def test_keyring_missing_key_says_how_to_set_it(keyring_clean: dict[str, str]) -> None:
    with pytest.raises(KeySourceError) as caught:
        resolve("dev", KeySpec("keyring"), {})
    text = str(caught.value)
    assert "environment 'dev'" in text and "key source 'keyring'" in text
    assert 'service "skyproxy", username "dev"' in text
    assert text.endswith("run: skyproxy key set dev")


def test_keyring_missing_key_with_a_username(keyring_clean: dict[str, str]) -> None:
    with pytest.raises(KeySourceError) as caught:
        resolve("dev", KeySpec("keyring", "keys-test-user"), {})
    assert "run: skyproxy key set keys-test-user" in str(caught.value)


def test_keyring_key_with_whitespace_is_refused(keyring_clean: dict[str, str]) -> None:
    import keyring

    keyring.set_password(SERVICE, "dev", "sk-has space-1234")
    with pytest.raises(KeySourceError, match="whitespace"):
        resolve("dev", KeySpec("keyring"), {})


def test_check_subprocess_reads_the_keyring(keyring_clean: dict[str, str], tmp_path: Path) -> None:
    import keyring

    keyring.set_password(SERVICE, "dev", CANARY)
    config = write_config(tmp_path, '[environments.dev]\nlisten = ["127.0.0.1:8787"]\nkey = "keyring"\n')
    result = subprocess.run(
        [*skyproxy_command(), "check", "-c", str(config)],
        env={**os.environ, **keyring_clean},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert fingerprint(CANARY) in result.stdout
    assert_no_canary(result.stdout, result.stderr)


# -- no keyring backend ----------------------------------------------------------------------


def _without_keyring(tmp_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring", "HOME": str(tmp_path)}
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    return subprocess.run(
        [*skyproxy_command(), *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_no_keyring_backend_points_to_credential_and_env(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[environments.dev]\nlisten = ["127.0.0.1:8787"]\nkey = "keyring"\n')
    result = _without_keyring(tmp_path, "check", "-c", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout + result.stderr
    assert "no keyring backend is available" in out
    assert 'key = "credential:dev"' in out and 'key = "env:VAR"' in out
    assert "Traceback" not in out


def test_no_keyring_backend_on_key_set(tmp_path: Path) -> None:
    result = _without_keyring(tmp_path, "key", "set", "dev", "--stdin", stdin=CANARY + "\n")
    assert result.returncode == 1
    assert "no keyring backend is available" in result.stderr
    assert "credential:" in result.stderr and "env:" in result.stderr
    assert "Traceback" not in result.stderr
    assert_no_canary(result.stdout, result.stderr)
