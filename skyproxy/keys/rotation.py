"""Key management commands: set, show, delete, rotate and rollback, in the keyring.

Rotation follows the Skytells guide's order: new key, verify it, store it (keeping the
old one as ENV@previous), switch the running daemon, confirm, then revoke the old key.
"""

from __future__ import annotations

import getpass
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from skyproxy import config
from skyproxy.config import EnvironmentSettings, KeySpec, Settings
from skyproxy.errors import KeySourceError, KeyStoreError, SkyproxyError
from skyproxy.keys import ages as keystate
from skyproxy.keys.sources import Secret, delete_stored, keyring_username, load_stored, resolve, store

Say = Callable[[str], None]


def read_key(from_stdin: bool) -> Secret:
    """The new key, from a no-echo prompt or standard input; never from argv."""
    raw = sys.stdin.readline() if from_stdin else getpass.getpass("Skytells API key (input hidden): ")
    value = raw.strip()
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise SkyproxyError("the key is empty or contains whitespace")
    return Secret(value)


def _settings(path: str | None) -> Settings | None:
    try:
        return config.load(config.find_config(path))
    except SkyproxyError:
        if path:
            raise
        return None  # key commands work without a config; they fall back to defaults


def _state_file(settings: Settings | None) -> Path:
    return settings.key_state_file if settings else keystate.default_state_file()


def _username(settings: Settings | None, environment: str) -> str:
    env = settings.environments.get(environment) if settings else None
    if env is not None and env.key.kind == "keyring":
        return keyring_username(environment, env.key)
    return environment


def set_key(environment: str, key: Secret, config_path: str | None) -> str:
    settings = _settings(config_path)
    store(_username(settings, environment), key.reveal())
    keystate.record(_state_file(settings), environment, key.fingerprint)
    return key.fingerprint


def delete_key(environment: str, config_path: str | None) -> bool:
    settings = _settings(config_path)
    deleted = delete_stored(_username(settings, environment))
    if deleted:
        keystate.forget(_state_file(settings), environment)
    return deleted


def describe(config_path: str | None, only: str | None = None) -> list[tuple[str, str, str, str, str]]:
    settings = _settings(config_path)
    records = keystate.read(_state_file(settings))
    envs = dict(settings.environments) if settings is not None else {}
    if only is not None and only not in envs:
        envs = {only: EnvironmentSettings(only, (), config.DEFAULT_UPSTREAM, KeySpec("keyring"), ())}
    elif only is not None:
        envs = {only: envs[only]}
    rows = []
    limit = settings.keys.max_age_days if settings else 90
    for name, env in envs.items():
        if env.key.kind == "generated":
            rows.append((name, str(env.key), "-", "-", "ok (a new key each start)"))
            continue
        try:
            key = resolve(name, env.key)
        except KeySourceError as exc:
            fix = f"; {exc.fix}" if exc.fix else ""
            rows.append((name, str(env.key), "-", "-", f"error: {exc.reason}{fix}"))
            continue
        known = records.get(name)
        age = known.age_days() if known and known.fingerprint == key.fingerprint else None
        status = "ok" if age is None or age <= limit else f"ok, but older than {limit} days: rotate"
        rows.append((name, str(env.key), key.fingerprint, "-" if age is None else f"{age}d", status))
    return rows


# -- rotation ---------------------------------------------------------------------------------


def _environment(settings: Settings | None, environment: str) -> EnvironmentSettings:
    if settings is None:
        raise SkyproxyError("rotation needs the config (-c FILE) to find the upstream and daemon")
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
    """Asks a running daemon to reload and waits until it serves `fingerprint`."""
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


def rotate(environment: str, new: Secret, config_path: str | None, timeout: float, say: Say) -> int:
    settings = _settings(config_path)
    env = _environment(settings, environment)
    assert settings is not None
    username = keyring_username(environment, env.key)
    verify(env, new)
    say(f"verified the new key {new.fingerprint} against {env.upstream}")
    old = load_stored(username)
    if old is not None:
        store(f"{username}@previous", old.reveal())
    store(username, new.reveal())
    keystate.record(settings.key_state_file, environment, new.fingerprint)
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
    return 0


def rollback(environment: str, config_path: str | None, say: Say) -> int:
    settings = _settings(config_path)
    env = _environment(settings, environment)
    assert settings is not None
    username = keyring_username(environment, env.key)
    previous = load_stored(f"{username}@previous")
    if previous is None:
        raise KeyStoreError(f"no previous key stored for {environment} ({username}@previous)")
    current = load_stored(username)
    store(username, previous.reveal())
    if current is not None:
        store(f"{username}@previous", current.reveal())
    keystate.record(settings.key_state_file, environment, previous.fingerprint)
    say(f"restored {previous.fingerprint} as the current key for {environment}")
    if switch_daemon(env, previous.fingerprint, 30.0, say):
        say(f"the daemon now serves {environment} with {previous.fingerprint}")
    return 0
