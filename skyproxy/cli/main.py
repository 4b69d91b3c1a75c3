"""The command line: the only place that prints and exits.

Heavy modules are imported inside the commands that need them, so that `--help` and
`--version` start fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from skyproxy import __version__

if TYPE_CHECKING:
    from skyproxy.config import Settings

EXIT_OK, EXIT_KEY, EXIT_CONFIG = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CONFIG
    from skyproxy.errors import ConfigError, SkyproxyError

    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"skyproxy: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except SkyproxyError as exc:
        print(f"skyproxy: {exc}", file=sys.stderr)
        return EXIT_KEY
    except KeyboardInterrupt:
        return 130
    return code


class _ArgumentParser(argparse.ArgumentParser):
    """Never echoes an unexpected argument: it may be a key pasted on the command line."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            message = (
                "unrecognized arguments (not shown: keys are never taken from the command line; "
                "use the prompt or --stdin)"
            )
        super().error(message)


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="skyproxy",
        description="Keep Skytells API keys server-side: a local key-injecting proxy.",
    )
    parser.add_argument("--version", action="version", version=f"skyproxy {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-c", "--config", help="config file (default: $SKYPROXY_CONFIG, ./skyproxy.toml, ...)")
        return p

    command("serve", "run the proxy").set_defaults(func=cmd_serve)
    command("check", "validate the config and resolve every key").set_defaults(func=cmd_check)

    key = sub.add_parser("key", help="manage keys in the keyring").add_subparsers(metavar="ACTION")
    for name, func, help_text in (
        ("set", cmd_key_set, "store an environment's key (prompted, or --stdin)"),
        (
            "rotate",
            cmd_key_rotate,
            "verify a new key, store it, reload the daemon, keep the old as ENV@previous",
        ),
    ):
        p = key.add_parser(name, help=help_text, description=help_text)
        p.add_argument("environment")
        p.add_argument("--stdin", action="store_true", help="read the key from standard input")
        p.add_argument("-c", "--config")
        if name == "rotate":
            p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon")
        p.set_defaults(func=func)
    for name, func, help_text in (
        ("show", cmd_key_show, "show an environment's key fingerprint, source and age"),
        ("delete", cmd_key_delete, "delete an environment's key from the keyring"),
        ("rollback", cmd_key_rollback, "restore ENV@previous as the current key"),
    ):
        p = key.add_parser(name, help=help_text, description=help_text)
        p.add_argument("environment")
        p.add_argument("-c", "--config")
        p.set_defaults(func=func)
    p = key.add_parser("list", help="list every environment's key fingerprint, source and age")
    p.add_argument("-c", "--config")
    p.set_defaults(func=cmd_key_list)

    audit = sub.add_parser("audit", help="read the audit trail").add_subparsers(metavar="ACTION")
    p = audit.add_parser("summary", help="predictions, failures, latency and cost by a key")
    p.add_argument("-c", "--config")
    p.add_argument("--since", help="1h, 1d, 30m, 2w or an ISO timestamp")
    p.add_argument("--by", choices=("user", "model", "environment", "status"), default="user")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_audit_summary)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    from skyproxy import config

    return config.load(config.find_config(args.config))


# -- serve ------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from skyproxy.daemon.logs import configure_logging
    from skyproxy.daemon.notify import Notifier
    from skyproxy.daemon.supervisor import StartupError, Supervisor

    settings = _settings(args)
    configure_logging(settings.server.log_level)
    notifier = Notifier.from_environ()
    server = Supervisor(settings, notifier, own_process=True)  # a daemon's own process
    try:
        _run(server.run(), settings.server.event_loop)
    except StartupError as exc:
        print(f"skyproxy: cannot start:\n{exc}", file=sys.stderr)
        return EXIT_KEY
    finally:
        if notifier:
            notifier.close()
    del asyncio
    return EXIT_OK


def _run(coro: object, event_loop: str) -> None:
    import asyncio

    if event_loop != "asyncio":
        try:
            import uvloop

            uvloop.run(coro)  # type: ignore[arg-type]
            return
        except ImportError:
            if event_loop == "uvloop":
                raise SystemExit('skyproxy: event_loop = "uvloop" but uvloop is not installed') from None
    asyncio.run(coro)  # type: ignore[arg-type]


# -- check ------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from skyproxy.errors import KeySourceError
    from skyproxy.keys import ages as keystate
    from skyproxy.keys.sources import resolve

    settings = _settings(args)
    records = keystate.read(settings.key_state_file)
    rows = [("ENVIRONMENT", "LISTEN", "UPSTREAM", "KEY SOURCE", "FINGERPRINT", "STATUS")]
    failed = False
    notes: list[str] = []
    for name, env in settings.environments.items():
        listen = ",".join(str(x) for x in env.listen)
        try:
            key = resolve(name, env.key)
        except KeySourceError as exc:
            failed = True
            rows.append((name, listen, env.upstream, str(env.key), "-", "error"))
            notes.append(f"{name}: {exc.reason}" + (f"; {exc.fix}" if exc.fix else ""))
            continue
        status = "ok"
        known = records.get(name)
        if known and known.fingerprint == key.fingerprint:
            age = known.age_days()
            if age > settings.keys.max_age_days:
                status = f"ok (key {age} days old: rotate)"
        rows.append((name, listen, env.upstream, str(env.key), key.fingerprint, status))
    print(f"config {settings.path}: valid")
    print(_table(rows))
    for note in notes:
        print(f"  {note}")
    return EXIT_KEY if failed else EXIT_OK


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


# -- keys -------------------------------------------------------------------------------------


def cmd_key_set(args: argparse.Namespace) -> int:
    from skyproxy.keys import rotation as keyops

    fp = keyops.set_key(args.environment, keyops.read_key(args.stdin), args.config)
    print(f"stored the key for {args.environment} in the keyring: {fp}")
    return EXIT_OK


def cmd_key_show(args: argparse.Namespace) -> int:
    from skyproxy.keys import rotation as keyops

    rows = [("ENVIRONMENT", "SOURCE", "FINGERPRINT", "AGE", "STATUS")]
    rows.extend(keyops.describe(args.config, only=args.environment))
    print(_table(rows))
    return EXIT_OK if all(r[-1].startswith("ok") for r in rows[1:]) else EXIT_KEY


def cmd_key_list(args: argparse.Namespace) -> int:
    from skyproxy.keys import rotation as keyops

    rows = [("ENVIRONMENT", "SOURCE", "FINGERPRINT", "AGE", "STATUS")]
    rows.extend(keyops.describe(args.config))
    print(_table(rows))
    return EXIT_OK if all(r[-1].startswith("ok") for r in rows[1:]) else EXIT_KEY


def cmd_key_delete(args: argparse.Namespace) -> int:
    from skyproxy.keys import rotation as keyops

    if keyops.delete_key(args.environment, args.config):
        print(f"deleted the key for {args.environment} from the keyring")
        return EXIT_OK
    print(f"skyproxy: no key stored for {args.environment}", file=sys.stderr)
    return EXIT_KEY


def cmd_key_rotate(args: argparse.Namespace) -> int:
    from skyproxy.keys import rotation as keyops

    return keyops.rotate(args.environment, keyops.read_key(args.stdin), args.config, args.timeout, print)


def cmd_key_rollback(args: argparse.Namespace) -> int:
    from skyproxy.keys import rotation as keyops

    return keyops.rollback(args.environment, args.config, print)


# -- audit ------------------------------------------------------------------------------------


def cmd_audit_summary(args: argparse.Namespace) -> int:
    import json
    from datetime import datetime, timezone

    from skyproxy.audit import summary

    settings = _settings(args)
    since = None
    if args.since:
        try:
            since = summary.parse_since(args.since, datetime.now(timezone.utc))
        except ValueError as exc:
            print(f"skyproxy: --since: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    result = summary.summarize(summary.audit_files(settings.audit.path), since, args.by)
    if args.json:
        print(json.dumps(summary.to_json(result), indent=2))
    else:
        print(summary.format_table(result))
    return EXIT_OK
