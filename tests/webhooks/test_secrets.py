"""Resolving webhook secrets: which keys verify Skytells, and the relay's own secret and its rotation."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest
from helpers import CANARY, assert_no_canary, write_config

from skyproxy import config
from skyproxy.keys.secret import Secret
from skyproxy.webhooks import secrets
from skyproxy.webhooks.signing import SigningSecret, new_secret


def settings(tmp_path: Path, body: str) -> config.Settings:
    text = '[environments.dev]\nlisten = ["127.0.0.1:0"]\nupstream = "mock"\n' + body
    return config.load(write_config(tmp_path, text), {})


def test_an_environment_is_verified_with_its_key_or_its_webhook_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_SECRET", "enterprise-secret")
    text = (
        '[environments.prod]\nlisten = ["127.0.0.1:1"]\nupstream = "mock"\n'
        'webhook_secret = "env:HOOK_SECRET"\n[webhooks]\n'
    )
    found = secrets.verifiers(settings(tmp_path, text), {"dev": Secret(CANARY), "prod": Secret("sk-p")})
    assert found["dev"] == (Secret(CANARY),)
    assert found["prod"] == (Secret("enterprise-secret"),)  # not the key, in enterprise mode


def test_create_writes_a_file_secret_for_the_owner_only_and_rotate_keeps_the_old(tmp_path: Path) -> None:
    hooks = settings(tmp_path, '[webhooks]\nsigning_secret = "file:state/whsec"\n').webhooks
    assert hooks is not None
    with pytest.raises(secrets.SigningSecretError, match="run: skyproxy webhooks secret"):
        secrets.signing_keys(hooks, None)
    first = secrets.create(hooks, rotate=False)
    path = Path(hooks.signing_secret.arg)
    assert first.stored and not first.kept_previous
    assert path.read_text().strip() == first.text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    SigningSecret(first.text)
    with pytest.raises(secrets.SkyproxyError, match="--rotate"):
        secrets.create(hooks, rotate=False)
    second = secrets.create(hooks, rotate=True)
    assert second.kept_previous and second.text != first.text
    now = time.time()
    keys = secrets.signing_keys(hooks, rotated_at=now)
    assert [k.fingerprint for k in keys.active(now)] == [
        SigningSecret(second.text).fingerprint,
        SigningSecret(first.text).fingerprint,
    ]
    assert keys.active(now + secrets.ROTATION_GRACE + 1) == (keys.current,)
    [alone] = secrets.signing_keys(hooks, rotated_at=None).active(now)
    assert alone.fingerprint == keys.current.fingerprint


def test_an_env_secret_is_printed_for_the_user_to_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks = settings(tmp_path, '[webhooks]\nsigning_secret = "env:WHSEC"\n').webhooks
    assert hooks is not None
    made = secrets.create(hooks, rotate=False)
    assert not made.stored
    with pytest.raises(secrets.SkyproxyError, match="managed outside skyproxy"):
        secrets.create(hooks, rotate=True)
    with pytest.raises(secrets.SigningSecretError) as caught:
        secrets.signing_keys(hooks, None)
    assert "export WHSEC" in str(caught.value) and "[webhooks] signing_secret" in str(caught.value)
    monkeypatch.setenv("WHSEC", "not-a-whsec")
    with pytest.raises(secrets.SigningSecretError, match="not a Standard Webhooks secret"):
        secrets.signing_keys(hooks, None)
    monkeypatch.setenv("WHSEC", new_secret())
    assert_no_canary(repr(secrets.signing_keys(hooks, None)))


def test_the_previous_key_in_the_keyring_verifies_during_a_rotation(
    tmp_path: Path, secret_service: dict[str, str]
) -> None:
    from skyproxy.keys import store

    store.save("hooks-env", Secret("sk-current-key"))
    store.save("hooks-env@previous", Secret("sk-previous-key"))
    text = '[environments.k]\nlisten = ["127.0.0.1:1"]\nkey = "keyring:hooks-env"\n[webhooks]\n'
    found = secrets.verifiers(
        settings(tmp_path, text), {"dev": Secret(CANARY), "k": Secret("sk-current-key")}
    )
    assert found["k"] == (Secret("sk-current-key"), Secret("sk-previous-key"))
    assert found["dev"] == (Secret(CANARY),)  # a generated mock key has no previous one
