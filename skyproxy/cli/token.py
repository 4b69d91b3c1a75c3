"""`skyproxy token create|list|revoke`: client tokens, stored as hashes in the tokens file."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from skyproxy.config import Settings
    from skyproxy.tokens.store import TokenRecord

from skyproxy.cli.common import EXIT_OK, load_settings, table


def register(sub: Any) -> None:
    """Adds the `token` command and its actions to the top-level subparsers."""
    token = sub.add_parser("token", help="manage client tokens (what apps present instead of a key)")
    actions = token.add_subparsers(metavar="ACTION")
    p = actions.add_parser("create", help="make a token; printed once, on stdout, alone")
    p.add_argument("name")
    p.add_argument("--env", action="append", required=True, metavar="ENV", help="an environment it may use")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--user", help="bind it to this user: the user header is then ignored")
    who.add_argument(
        "--trust-user-header", action="store_true", help="a backend for many users: take the user header"
    )
    p.add_argument("--expires", type=int, metavar="DAYS", help="days until it stops working")
    p.add_argument("-c", "--config")
    p.set_defaults(func=cmd_token_create)
    p = actions.add_parser("list", help="every token's name, fingerprint and rights (never the token)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-c", "--config")
    p.set_defaults(func=cmd_token_list)
    p = actions.add_parser("revoke", help="remove a token; a running daemon refuses it within 2 seconds")
    p.add_argument("name")
    p.add_argument("-c", "--config")
    p.set_defaults(func=cmd_token_revoke)


def cmd_token_create(args: argparse.Namespace) -> int:
    from skyproxy.errors import SkyproxyError
    from skyproxy.tokens import store

    settings = load_settings(args.config)
    environments = list(dict.fromkeys(args.env))
    unknown = [e for e in environments if e not in settings.environments]
    if unknown:
        raise SkyproxyError(f"no environment named {unknown[0]!r} in {settings.path}")
    token = store.create(
        settings.tokens_file,
        args.name,
        environments,
        user=args.user,
        trust_user_header=args.trust_user_header,
        expires_days=args.expires,
    )
    print(token.reveal())  # alone on stdout, so that a script can capture it
    note = (
        f"created token {args.name} ({token.fingerprint}) for {', '.join(environments)} in "
        f"{settings.tokens_file}; only its hash is stored: it will not be shown again"
    )
    print(note, file=sys.stderr)
    for name in environments:
        if settings.environments[name].client_auth == "off":
            print(
                f'note: environment {name} has client_auth = "off": tokens are not checked there',
                file=sys.stderr,
            )
    return EXIT_OK


def cmd_token_list(args: argparse.Namespace) -> int:
    from skyproxy.tokens import store

    settings = load_settings(args.config)
    records = store.read(settings.tokens_file)
    now = datetime.now(timezone.utc)
    if args.json:
        print(json.dumps([_json(r, now) for r in records], indent=2))
        return EXIT_OK
    if not records:
        print(f"no tokens in {settings.tokens_file}", file=sys.stderr)
        return EXIT_OK
    rows = [("NAME", "FINGERPRINT", "ENVIRONMENTS", "USER", "CREATED", "EXPIRES", "LAST USED", "STATUS")]
    for r in records:
        rows.append(
            (
                r.name,
                r.fingerprint,
                ",".join(sorted(r.environments)),
                r.binding(),
                store.iso(r.created),
                "never" if r.expires is None else store.iso(r.expires),
                "never" if r.last_used is None else store.iso(r.last_used),
                "expired" if r.expires is not None and r.expires <= now else "ok",
            )
        )
    print(table(rows))
    return EXIT_OK


def _json(record: TokenRecord, now: datetime) -> dict[str, object]:
    shown = record.to_json()
    del shown["sha256"]
    return {
        "name": shown.pop("name"),
        "fingerprint": record.fingerprint,
        **shown,
        "expired": record.expires is not None and record.expires <= now,
    }


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from skyproxy.tokens import store

    settings = load_settings(args.config)
    record = store.revoke(settings.tokens_file, args.name)  # an unknown name: exit 1, from main
    print(f"revoked token {record.name} ({record.fingerprint}); a running daemon refuses it within 2 seconds")
    return EXIT_OK


def print_access_notes(settings: Settings) -> bool:
    """`check`'s lines about client tokens; False when the tokens file cannot be used."""
    from skyproxy.tokens import store

    for env in settings.environments.values():
        exposed = [str(listen) for listen in env.listen if not listen.is_loopback]
        if exposed and env.client_auth == "off":
            print(
                f"  warning: {env.name} listens on {', '.join(exposed)} (not loopback) "
                'with client_auth = "off": any client in allowed_networks can spend, under any user name; '
                'set client_auth = "required" and give each app a token (skyproxy token create)'
            )
    if all(env.client_auth == "off" for env in settings.environments.values()):
        return True
    try:
        records = store.read(settings.tokens_file)
    except store.TokenFileError as exc:
        print(f"  {exc}")
        return False
    print(f"  tokens: {len(records)} in {settings.tokens_file}")
    return True
