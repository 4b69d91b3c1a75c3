"""Changing a key in the keyring: set, delete, rotate and roll back, keeping its age.

Rotation follows the Skytells guide's order: new key, verify it, store it (keeping the
old one as ENV@previous), switch the running daemon, confirm, then revoke the old key.
`set` and `delete` work without a config: the environment's name is then the keyring
username, and the key state file is in its default place. Rotation needs the config to
find the upstream that verifies the new key and the daemon to switch.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from skyproxy.config import EnvironmentSettings, Settings
from skyproxy.errors import KeyStoreError, SkyproxyError
from skyproxy.keys import ages, store
from skyproxy.keys.secret import Secret

Say = Callable[[str], None]


def set_key(settings: Settings | None, environment: str, key: Secret) -> None:
    store.save(_username(settings, environment), key)
    ages.record(_state_file(settings), environment, key.fingerprint)


def delete_key(settings: Settings | None, environment: str) -> bool:
    """Deletes the environment's key; False when none was stored."""
    deleted = store.delete(_username(settings, environment))
    if deleted:
        ages.forget(_state_file(settings), environment)
    return deleted


def _state_file(settings: Settings | None) -> Path:
    return settings.key_state_file if settings else ages.default_state_file()


def _username(settings: Settings | None, environment: str) -> str:
    env = settings.environments.get(environment) if settings else None
    if env is not None and env.key.kind == "keyring":
        return store.username(environment, env.key)
    return environment


def rotate(settings: Settings, environment: str, new: Secret, timeout: float, say: Say) -> None:
    env = _keyring_environment(settings, environment)
    username = store.username(environment, env.key)
    verify(env, new)
    say(f"verified the new key {new.fingerprint} against {env.upstream}")
    old = store.load(username)
    if old is not None:
        store.save(f"{username}@previous", old)
    store.save(username, new)
    ages.record(settings.key_state_file, environment, new.fingerprint)
    say(
        f"stored {new.fingerprint} as the current key"
        + (f"; kept {old.fingerprint} as {username}@previous" if old else "")
    )
    if switch_daemon(env, new.fingerprint, timeout, say):
        say(f"the daemon now serves {environment} with {new.fingerprint}")
    if old is not None:
        say(
            f"next: watch the logs for a few minutes, then revoke the old key {old.fingerprint} "
            "in the Skytells dashboard (undo before that with: skyproxy key rollback "
            f"{environment})"
        )


def rollback(settings: Settings, environment: str, say: Say) -> None:
    env = _keyring_environment(settings, environment)
    username = store.username(environment, env.key)
    previous = store.load(f"{username}@previous")
    if previous is None:
        raise KeyStoreError(f"no previous key stored for {environment} ({username}@previous)")
    current = store.load(username)
    store.save(username, previous)
    if current is not None:
        store.save(f"{username}@previous", current)
    ages.record(settings.key_state_file, environment, previous.fingerprint)
    say(f"restored {previous.fingerprint} as the current key for {environment}")
    if switch_daemon(env, previous.fingerprint, 30.0, say):
        say(f"the daemon now serves {environment} with {previous.fingerprint}")


def _keyring_environment(settings: Settings, environment: str) -> EnvironmentSettings:
    env = settings.environments.get(environment)
    if env is None:
        raise SkyproxyError(f"no environment {environment!r} in {settings.path}")
    if env.key.kind != "keyring":
        raise SkyproxyError(
            f"environment {environment!r} takes its key from {env.key}; rotate it there, "
            "then reload the daemon (systemctl reload skyproxy or kill -HUP)"
        )
    return env


def verify(env: EnvironmentSettings, key: Secret, timeout: float = 15.0) -> None:
    """One cheap authenticated call; refuses a key the upstream answers 401 or 403 to."""
    if env.is_mock:
        raise SkyproxyError("this environment uses the embedded mock; there is nothing to rotate")
    request = urllib.request.Request(
        f"{env.upstream}/v1/models",
        headers={"x-api-key": key.reveal(), "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read(1)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise SkyproxyError(
                f"the upstream refused the new key {key.fingerprint} ({exc.code}); nothing was changed"
            ) from None
        raise SkyproxyError(
            f"verifying the new key failed: upstream answered {exc.code}; nothing was changed"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SkyproxyError(
            f"cannot reach {env.upstream} to verify the key ({reason}); nothing was changed"
        ) from None


def _daemon_url(env: EnvironmentSettings) -> str:
    listen = env.listen[0]
    host = listen.host
    if host in ("0.0.0.0", "localhost"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{listen.port}" if ":" in host else f"http://{host}:{listen.port}"


def _call(url: str, method: str = "GET", timeout: float = 10.0) -> dict[str, object]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            result: dict[str, object] = json.loads(answer.read())
            return result
    except urllib.error.HTTPError as exc:
        failed: dict[str, object] = json.loads(exc.read() or b"{}")
        return failed


def switch_daemon(env: EnvironmentSettings, fingerprint: str, timeout: float, say: Say) -> bool:
    """Asks a running daemon to reload and waits until it serves `fingerprint`.

    False when no daemon answers: the new key is then used when it starts.
    """
    base = _daemon_url(env)
    try:
        answer = _call(f"{base}/-/reload", "POST")
    except (urllib.error.URLError, OSError):
        say(f"no running daemon answered at {base}; the new key is used when it starts")
        return False
    if answer.get("ok") is False:
        say(f"the daemon reported a reload problem: {answer.get('error')}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _call(f"{base}/-/status")
        envs = status.get("environments", {})
        current = envs.get(env.name, {}).get("key", {}).get("fingerprint") if isinstance(envs, dict) else None
        if current == fingerprint:
            return True
        time.sleep(0.2)
    raise SkyproxyError(
        f"the daemon at {base} did not switch to {fingerprint} within {timeout:g}s; "
        "check its log (journalctl -u skyproxy)"
    )
