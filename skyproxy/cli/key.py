"""`skyproxy key set|show|list|delete|rotate|rollback`: keys in the keyring, never on argv.

The new key comes from a no-echo prompt or standard input. `set`, `show`, `list` and
`delete` work without a config file; rotation needs one.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import TYPE_CHECKING

from skyproxy.cli.common import EXIT_KEY, EXIT_OK, load_settings, table
from skyproxy.errors import SkyproxyError
from skyproxy.keys.secret import Secret

if TYPE_CHECKING:
    from skyproxy.config import Settings
    from skyproxy.keys.status import KeyStatus


def read_key(from_stdin: bool, prompt: str = "Skytells API key (input hidden): ") -> Secret:
    """The new key, from a no-echo prompt or standard input; never from argv.

    Without a terminal there is nothing to prompt on (getpass would warn, then fail on
    end of input), so a piped key is read as with --stdin.
    """
    if not from_stdin and not sys.stdin.isatty():
        from_stdin = True
    raw = sys.stdin.readline() if from_stdin else getpass.getpass(prompt)
    value = raw.strip()
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise SkyproxyError("the key is empty or contains whitespace")
    return Secret(value)


def status_text(status: KeyStatus, *, problem_inline: bool = True) -> str:
    if status.problem is not None:
        return f"error: {status.problem}" if problem_inline else "error"
    if status.generated:
        return "ok (a new key each start)"
    if status.too_old:
        return f"ok (key {status.age_days} days old: rotate)"
    return "ok"


def fingerprint_text(status: KeyStatus) -> str:
    """The fingerprint to show; none for a mock's key, which this process did not make."""
    if status.generated or status.fingerprint is None:
        return "-"
    return status.fingerprint


def cmd_key_set(args: argparse.Namespace) -> int:
    from skyproxy.keys import rotation

    settings = _optional_settings(args.config)
    _check_environment(settings, args.environment)
    key = read_key(args.stdin)
    rotation.set_key(settings, args.environment, key)
    print(f"stored the key for {args.environment} in the keyring: {key.fingerprint}")
    return EXIT_OK


def cmd_key_show(args: argparse.Namespace) -> int:
    return _print_statuses(args.config, args.environment)


def cmd_key_list(args: argparse.Namespace) -> int:
    return _print_statuses(args.config, None)


def cmd_key_delete(args: argparse.Namespace) -> int:
    from skyproxy.keys import rotation

    if rotation.delete_key(_optional_settings(args.config), args.environment):
        print(f"deleted the key for {args.environment} from the keyring")
        return EXIT_OK
    print(f"skyproxy: no key stored for {args.environment}", file=sys.stderr)
    return EXIT_KEY


def cmd_key_rotate(args: argparse.Namespace) -> int:
    from skyproxy.keys import rotation

    settings = _rotation_settings(args.config)
    rotation.rotate(settings, args.environment, read_key(args.stdin), args.timeout, print)
    return EXIT_OK


def cmd_key_rollback(args: argparse.Namespace) -> int:
    from skyproxy.keys import rotation

    rotation.rollback(_rotation_settings(args.config), args.environment, print)
    return EXIT_OK


def _optional_settings(path: str | None) -> Settings | None:
    """The config, or None when none was named and none is found: key commands then use defaults."""
    try:
        return load_settings(path)
    except SkyproxyError:
        if path:
            raise
        return None


def _check_environment(settings: Settings | None, environment: str) -> None:
    """Refuses a key the config would never use: a typo, or an environment served by the mock."""
    if settings is None:
        return
    env = settings.environments.get(environment)
    if env is None:
        known = ", ".join(settings.environments) or "none"
        raise SkyproxyError(
            f"no environment {environment!r} in {settings.path} (its environments: {known}); "
            "a key stored under another name would never be used"
        )
    if env.is_mock:
        raise SkyproxyError(
            f'environment {environment!r} uses the embedded mock (upstream = "mock"), which needs no '
            f'key; to use a real key, set upstream = "https://api.skytells.ai" and key = "keyring" '
            f"for it in {settings.path}, or run: skyproxy init"
        )
    if env.key.kind != "keyring":
        raise SkyproxyError(
            f"environment {environment!r} takes its key from {env.key}, not the keyring; store it there"
        )


def _rotation_settings(path: str | None) -> Settings:
    settings = _optional_settings(path)
    if settings is None:
        raise SkyproxyError("rotation needs the config (-c FILE) to find the upstream and daemon")
    return settings


def _print_statuses(config_path: str | None, only: str | None) -> int:
    """One row per environment (or just `only`): source, fingerprint, age, status."""
    from skyproxy.config import KeySpec, KeysSettings
    from skyproxy.keys import ages
    from skyproxy.keys.status import key_statuses

    settings = _optional_settings(config_path)
    if settings is None and only is None:
        print(
            "skyproxy: no config found (searched -c, $SKYPROXY_CONFIG, ./skyproxy.toml, "
            "~/.config/skyproxy/skyproxy.toml, /etc/skyproxy/skyproxy.toml); name one with -c",
            file=sys.stderr,
        )
        return EXIT_KEY
    specs = {name: env.key for name, env in settings.environments.items()} if settings else {}
    if only is not None:
        # An environment missing from the config may still have a key in the keyring.
        specs = {only: specs.get(only, KeySpec("keyring"))}
    state_file = settings.key_state_file if settings else ages.default_state_file()
    max_age = (settings.keys if settings else KeysSettings()).max_age_days
    statuses = key_statuses(specs, ages.read(state_file), max_age)
    rows = [("ENVIRONMENT", "SOURCE", "FINGERPRINT", "AGE", "STATUS")]
    for status in statuses:
        age = "-" if status.age_days is None else f"{status.age_days}d"
        rows.append(
            (status.environment, str(status.source), fingerprint_text(status), age, status_text(status))
        )
    print(table(rows))
    return EXIT_OK if all(status.ok for status in statuses) else EXIT_KEY
