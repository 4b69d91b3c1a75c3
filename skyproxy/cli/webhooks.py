"""`skyproxy webhooks list | replay | secret`: the store and the relay secret, daemon or not.

`replay` only writes to the store; a running daemon's relay picks the event up within a
second, so the daemon never needs to be stopped. With [cluster] the store holds routes
only: `list` reads the shared outbox in Redis instead, and `replay` is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from skyproxy.cli.common import EXIT_OK, load_settings, table

if TYPE_CHECKING:
    from skyproxy.config import Settings, WebhookSettings


def _hooks(settings: Settings) -> WebhookSettings:
    from skyproxy.errors import SkyproxyError

    if settings.webhooks is None:
        raise SkyproxyError(f"{settings.path} has no [webhooks] table")
    return settings.webhooks


def cmd_webhooks_list(args: argparse.Namespace) -> int:
    from skyproxy.webhooks.store import Store

    settings = load_settings(args.config)
    hooks = _hooks(settings)
    if settings.cluster is not None:
        return _print_listing(args, _shared_listing(settings, args.status, args.limit))
    store = Store(hooks.store)
    try:
        rows = store.listing(args.status, limit=args.limit)
    finally:
        store.close()
    objects = [
        {
            "id": r.id,
            "environment": r.environment,
            "predictionId": r.prediction_id,
            "event": r.event,
            "target": r.target,
            "status": r.status,
            "attempts": r.attempts,
            "receivedAt": _iso(r.received_at),
            "lastError": r.last_error,
        }
        for r in rows
    ]
    return _print_listing(args, objects)


def _print_listing(args: argparse.Namespace, objects: Sequence[Mapping[str, object]]) -> int:
    if args.json:
        for item in objects:
            print(json.dumps(item, separators=(",", ":")))
        return EXIT_OK
    header = ("ID", "ENVIRONMENT", "PREDICTION", "EVENT", "STATUS", "ATTEMPTS", "RECEIVED", "LAST ERROR")
    lines: list[tuple[str, ...]] = [header]
    for o in objects:
        lines.append(
            tuple(
                str(o[k] if o[k] is not None else "-")
                for k in (
                    "id",
                    "environment",
                    "predictionId",
                    "event",
                    "status",
                    "attempts",
                    "receivedAt",
                    "lastError",
                )
            )
        )
    print(table(lines))
    return EXIT_OK


def _shared_listing(settings: Settings, status: str | None, limit: int) -> list[dict[str, object]]:
    """With [cluster]: the deliveries in Redis, which keeps no delivered or dead event."""
    import asyncio

    from skyproxy.cluster.outbox_view import shared_deliveries

    assert settings.cluster is not None
    print(
        "skyproxy: [cluster]: the shared outbox in Redis, every replica's pending deliveries; "
        "delivered and dead events are not kept there (their audit and logs are per replica)",
        file=sys.stderr,
    )
    if status not in (None, "pending"):
        return []
    return [
        {
            "id": d.id,
            "environment": d.environment,
            "predictionId": None,
            "event": None,
            "target": d.target,
            "status": "pending",
            "attempts": d.attempts,
            "receivedAt": _iso(d.received_at),
            "lastError": "being delivered by a replica" if d.claimed else None,
        }
        for d in asyncio.run(shared_deliveries(settings.cluster, limit))
    ]


def cmd_webhooks_replay(args: argparse.Namespace) -> int:
    from skyproxy.errors import SkyproxyError
    from skyproxy.webhooks.store import Store

    settings = load_settings(args.config)
    if settings.cluster is not None:
        # The relays work from Redis then: an event queued again in this store would never be sent.
        raise SkyproxyError(
            f"{settings.path} has [cluster]: deliveries live in Redis, which keeps no delivered or "
            "dead event to send again; replay works on a daemon without [cluster]"
        )
    store = Store(_hooks(settings).store)
    try:
        before = store.replay(args.id, time.time())
    finally:
        store.close()
    print(f"queued {args.id} again (was {before}); a running daemon sends it within a second")
    return EXIT_OK


def cmd_webhooks_secret(args: argparse.Namespace) -> int:
    from skyproxy.webhooks import secrets
    from skyproxy.webhooks.store import Store

    settings = load_settings(args.config)
    hooks = _hooks(settings)
    made = secrets.create(hooks, rotate=args.rotate)
    if made.kept_previous:
        store = Store(hooks.store)
        try:
            store.set_meta(secrets.ROTATED_AT, repr(time.time()))
        finally:
            store.close()
    # Printed on purpose, once: this secret belongs to the app, which verifies with it.
    print(made.text)
    where = (
        f"stored in {hooks.signing_secret}"
        if made.stored
        else f"store it where {hooks.signing_secret} reads it"
    )
    note = "; the previous secret stays valid for 24 h" if made.kept_previous else ""
    print(f"skyproxy: {where}{note}; give it to the app for Standard Webhooks verification", file=sys.stderr)
    if made.kept_previous:
        _reload(settings)
    return EXIT_OK


def _reload(settings: Settings) -> None:
    """Asks a running daemon to reload, so that it signs with both secrets now."""
    import urllib.error
    import urllib.request

    env = next(iter(settings.environments.values()))
    listen = env.listen[0]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "localhost": "127.0.0.1"}.get(listen.host, listen.host)
    url = (
        f"http://[{host}]:{listen.port}/-/reload" if ":" in host else f"http://{host}:{listen.port}/-/reload"
    )
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b""), timeout=10):
            print("skyproxy: the running daemon reloaded", file=sys.stderr)
    except (urllib.error.URLError, OSError):
        print("skyproxy: no daemon answered; the new secret is used when it starts", file=sys.stderr)


def _iso(seconds: float) -> str:
    return (
        datetime.fromtimestamp(seconds, timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )
