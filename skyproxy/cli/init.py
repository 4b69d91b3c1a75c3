"""`skyproxy init`: from nothing to a checked config with real, verified keys.

Every question has a flag, so the same path runs interactively or from a script. A key
is read from a no-echo prompt (or standard input), verified with one cheap authenticated
call, and stored in the keyring, a mode-0600 file, or left for systemd credentials.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from skyproxy.cli.common import EXIT_OK
from skyproxy.errors import SkyproxyError
from skyproxy.keys.secret import Secret

DEFAULT_ENVIRONMENTS = "dev,production"
DEFAULT_UPSTREAM = "https://api.skytells.ai"
SOURCES = ("keyring", "file", "credential")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default="skyproxy.toml", help="where to write the config")
    p.add_argument("--environments", help=f"comma-separated names (default: {DEFAULT_ENVIRONMENTS})")
    p.add_argument("--upstream", help=f"the Skytells API base URL (default: {DEFAULT_UPSTREAM})")
    p.add_argument("--key-source", choices=SOURCES, help="where keys are kept (default: keyring)")
    p.add_argument("--keys-dir", help="folder for file: keys (default: ~/.config/skyproxy/keys)")
    p.add_argument("--port", type=int, default=8787, help="first listen port; one per environment")
    p.add_argument("--stdin", action="store_true", help="read the keys from standard input, one a line")
    p.add_argument("--no-verify", action="store_true", help="store keys without the verifying call")
    p.add_argument("--systemd-user", action="store_true", help="install and start the systemd user unit")
    p.add_argument("--yes", action="store_true", help="take the default for every question not given")
    p.add_argument("--force", action="store_true", help="overwrite an existing config")


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.config).expanduser().resolve()
    if path.exists() and not args.force:
        raise SkyproxyError(f"{path} exists; move it away or pass --force to overwrite it")
    ask = _Asker(args)
    names = _names(ask.text("Environments", args.environments, DEFAULT_ENVIRONMENTS))
    upstream = ask.text("Skytells API URL", args.upstream, DEFAULT_UPSTREAM).rstrip("/")
    source = ask.choice("Keep keys in", args.key_source, _default_source())
    keys_dir = Path(args.keys_dir or "~/.config/skyproxy/keys").expanduser()
    specs: dict[str, str] = {}
    for name in names:
        key = _read_key(name, args.stdin)
        if not args.no_verify:
            _verify(name, upstream, key)
            print(f"{name}: the upstream accepted key {key.fingerprint}")
        specs[name] = _store(name, key, source, keys_dir, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(names, upstream, specs, args.port), encoding="utf-8")
    print(f"wrote {path}")
    _record_ages(path, names, source)
    code = _check(path)
    print(snippets(args.port, names[0]))
    if ask.yes_no("Install and start the systemd user unit", args.systemd_user):
        install_user_unit(path)
    return code


class _Asker:
    """A flag's value when given; else the default with --yes or without a terminal; else a question."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.quiet = args.yes or args.stdin or not sys.stdin.isatty()

    def text(self, question: str, given: str | None, default: str) -> str:
        if given is not None:
            return given
        if self.quiet:
            return default
        return input(f"{question} [{default}]: ").strip() or default

    def choice(self, question: str, given: str | None, default: str) -> str:
        answer = self.text(f"{question} ({' | '.join(SOURCES)})", given, default)
        if answer not in SOURCES:
            raise SkyproxyError(f"{question}: expected one of {', '.join(SOURCES)}, got {answer!r}")
        return answer

    def yes_no(self, question: str, given: bool) -> bool:
        if given or self.quiet:
            return given
        return input(f"{question}? [y/N]: ").strip().lower() in ("y", "yes")


def _names(raw: str) -> list[str]:
    import re

    names = [n.strip() for n in raw.split(",") if n.strip()]
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_-]+", n)]
    if not names or bad or len(set(names)) != len(names):
        raise SkyproxyError(f"environments: expected distinct names of letters, digits, - and _, got {raw!r}")
    return names


def _default_source() -> str:
    import keyring
    from keyring.backends import fail

    return "file" if isinstance(keyring.get_keyring(), fail.Keyring) else "keyring"


def _read_key(name: str, from_stdin: bool) -> Secret:
    from skyproxy.cli.key import read_key

    return read_key(from_stdin, prompt=f"Skytells API key for {name} (input hidden): ")


def _verify(name: str, upstream: str, key: Secret) -> None:
    from skyproxy.config import EnvironmentSettings, KeySpec
    from skyproxy.keys.rotation import verify

    verify(EnvironmentSettings(name, (), upstream, KeySpec("keyring"), ()), key)


def _store(name: str, key: Secret, source: str, keys_dir: Path, config: Path) -> str:
    """Keeps the key where `source` says; returns the config's `key = ...` value."""
    if source == "keyring":
        from skyproxy.keys import store

        store.save(name, key)
        print(f"{name}: stored {key.fingerprint} in the keyring (service skyproxy, username {name})")
        return "keyring"
    if source == "file":
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = keys_dir / name
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(key.reveal() + "\n")
        os.chmod(target, 0o600)  # an existing file keeps its mode on open
        print(f"{name}: wrote {key.fingerprint} to {target} (mode 0600)")
        return f"file:{target}"
    print(
        f"{name}: under systemd, encrypt the key as a credential (it is read from standard input):\n"
        f"  sudo systemd-creds encrypt --name={name} - /etc/credstore.encrypted/skyproxy-{name}\n"
        f"  and add LoadCredentialEncrypted={name}:/etc/credstore.encrypted/skyproxy-{name} to the unit"
    )
    return f"credential:{name}"


def render(names: list[str], upstream: str, specs: dict[str, str], port: int) -> str:
    """The config text: commented, one listener per environment on consecutive ports."""
    lines = [
        "# skyproxy config written by `skyproxy init`. Every setting: skyproxy.toml.example.",
        "# Apps call http://127.0.0.1:PORT/v1/... with no key; skyproxy adds the environment's.",
        "",
        "[server]",
        "# Extra Host names besides localhost and the listen addresses (DNS-rebinding guard).",
        "allowed_hosts = []",
        '# Browser origins allowed to call the proxy, e.g. ["http://localhost:3000"].',
        "allowed_origins = []",
        "",
    ]
    for offset, name in enumerate(names):
        lines += [
            f"[environments.{name}]",
            f'listen = ["127.0.0.1:{port + offset}"]',
            f'upstream = "{upstream}"',
            f'key = "{specs[name]}"',
            "",
        ]
    lines += [
        "[rate_limit]",
        "# The header naming the end user; per-user limits and the audit use it.",
        'user_header = "X-User-Id"',
        "",
        "[audit]",
        "# One JSON line per prediction: who, which model, status, latency, cost.",
        'path = "audit/audit.jsonl"',
        "",
    ]
    return "\n".join(lines)


def _record_ages(path: Path, names: list[str], source: str) -> None:
    if source == "credential":
        return  # the key was not stored here; its age starts when the daemon first sees it
    from skyproxy import config
    from skyproxy.keys import ages
    from skyproxy.keys.sources import resolve

    settings = config.load(path)
    for name in names:
        ages.record(settings.key_state_file, name, resolve(name, settings.environments[name].key).fingerprint)


def _check(path: Path) -> int:
    from skyproxy.cli.serve import cmd_check

    print()
    return cmd_check(argparse.Namespace(config=str(path))) or EXIT_OK


def snippets(port: int, environment: str) -> str:
    base = f"http://127.0.0.1:{port}/v1"
    return f"""
Point an app at {environment} (no key in the app; any placeholder where an SDK wants one):

  curl -s {base}/predictions -H 'content-type: application/json' -H 'X-User-Id: alice' \\
    -d '{{"model":"truefusion-pro","input":{{"prompt":"a lighthouse"}}}}'

  # Python: pip install skytells
  from skytells import SkytellsClient
  client = SkytellsClient(api_key="via-skyproxy", base_url="{base}", headers={{"X-User-Id": "alice"}})
  print(client.run("truefusion-pro", input={{"prompt": "a lighthouse"}}).output)

  // JavaScript
  const r = await fetch("{base}/predictions", {{method: "POST",
    headers: {{"content-type": "application/json", "X-User-Id": "alice"}},
    body: JSON.stringify({{model: "truefusion-pro", input: {{prompt: "a lighthouse"}}}})}});

Run it: skyproxy serve -c <this config>
"""


def install_user_unit(config: Path, home: Path | None = None) -> Path:
    """Writes the user unit pointing at this skyproxy and config, then tries to start it."""
    home = home or Path.home()
    template = Path(__file__).resolve().parents[2] / "systemd" / "skyproxy-user.service"
    if not template.is_file():
        raise SkyproxyError(
            "the systemd unit ships in the source checkout's systemd/ folder; install it from there"
        )
    executable = shutil.which("skyproxy") or str(Path(sys.executable).parent / "skyproxy")
    text = template.read_text(encoding="utf-8").replace(
        "ExecStart=%h/.local/bin/skyproxy serve -c %h/.config/skyproxy/skyproxy.toml",
        f"ExecStart={executable} serve -c {config}",
    )
    unit = home / ".config" / "systemd" / "user" / "skyproxy.service"
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(text, encoding="utf-8")
    print(f"wrote {unit}")
    for command in (
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "skyproxy"],
    ):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"could not run {' '.join(command)}: {exc}; run it yourself", file=sys.stderr)
            break
        if done.returncode != 0:
            print(f"{' '.join(command)} failed: {done.stderr.strip()}; run it yourself", file=sys.stderr)
            break
    return unit
