"""The parser and the dispatch: a SkyproxyError from any command becomes one line on stderr.

The command bodies live in serve.py, key.py and audit.py. They import heavy modules
inside the commands that need them, so that `--help` and `--version` start fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from skyproxy import __version__
from skyproxy.cli import budget, token
from skyproxy.cli.audit import cmd_audit_summary
from skyproxy.cli.common import EXIT_CONFIG, EXIT_KEY
from skyproxy.cli.init import add_arguments as add_init_arguments
from skyproxy.cli.init import cmd_init
from skyproxy.cli.key import (
    cmd_key_delete,
    cmd_key_list,
    cmd_key_rollback,
    cmd_key_rotate,
    cmd_key_set,
    cmd_key_show,
)
from skyproxy.cli.serve import cmd_check, cmd_serve
from skyproxy.cli.webhooks import cmd_webhooks_list, cmd_webhooks_replay, cmd_webhooks_secret

CONFIG_HELP = "config file (default: $SKYPROXY_CONFIG, ./skyproxy.toml, ~/.config/skyproxy/skyproxy.toml)"


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
        p.add_argument("-c", "--config", help=CONFIG_HELP)
        return p

    init = sub.add_parser(
        "init",
        help="set up real keys and write a checked config",
        description="set up real keys and "
        "write a checked config: each key is read hidden, verified with one call, and stored",
    )
    add_init_arguments(init)
    init.set_defaults(func=cmd_init)
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
        p.add_argument("-c", "--config", help=CONFIG_HELP)
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
        p.add_argument("-c", "--config", help=CONFIG_HELP)
        p.set_defaults(func=func)
    p = key.add_parser("list", help="list every environment's key fingerprint, source and age")
    p.add_argument("-c", "--config", help=CONFIG_HELP)
    p.set_defaults(func=cmd_key_list)

    audit = sub.add_parser("audit", help="read the audit trail").add_subparsers(metavar="ACTION")
    p = audit.add_parser("summary", help="predictions, failures, latency and cost by a key")
    p.add_argument("-c", "--config", help=CONFIG_HELP)
    p.add_argument("--since", help="1h, 1d, 30m, 2w or an ISO timestamp")
    p.add_argument("--by", choices=("user", "model", "environment", "status"), default="user")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_audit_summary)
    token.register(sub)
    budget.register(sub)

    hooks = sub.add_parser("webhooks", help="relayed webhooks and the relay's secret").add_subparsers(
        metavar="ACTION"
    )
    p = hooks.add_parser("list", help="received events and their deliveries, newest first")
    p.add_argument("-c", "--config", help=CONFIG_HELP)
    p.add_argument("--status", choices=("pending", "delivered", "dead", "gone"))
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_webhooks_list)
    p = hooks.add_parser("replay", help="send a delivered or dead event again, with the same webhook-id")
    p.add_argument("id")
    p.add_argument("-c", "--config", help=CONFIG_HELP)
    p.set_defaults(func=cmd_webhooks_replay)
    p = hooks.add_parser("secret", help="create the relay's whsec_ secret, store it and print it")
    p.add_argument("--rotate", action="store_true", help="replace it; the old one stays valid for 24 h")
    p.add_argument("-c", "--config", help=CONFIG_HELP)
    p.set_defaults(func=cmd_webhooks_secret)
    return parser
