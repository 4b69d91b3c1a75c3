"""The dashboard's JSON documents, read from the daemon's state and the board's history.

None of them carries a key, a client token, a webhook route id or a Redis URL: keys and
tokens appear as names and fingerprints, webhook targets as their origin only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from skyproxy import __version__
from skyproxy.cluster.errors import ClusterUnavailable
from skyproxy.dashboard.board import Board
from skyproxy.dashboard.traffic import Bucket
from skyproxy.ops.shared_budgets import shared_report
from skyproxy.webhooks.store import Store, StoreError

if TYPE_CHECKING:
    from aiohttp import web

    from skyproxy.ops.dashboard import Dashboard

DEAD_SHOWN = 50
Build = Callable[["Dashboard", Board, "web.BaseRequest"], Any]


def summary(dashboard: Dashboard, board: Board, request: web.BaseRequest) -> dict[str, Any]:
    """The last minute at a glance."""
    now = int(time.time())
    minute = Bucket()
    for second in range(now - 60, now):
        found = board.traffic.short.get(second)
        if found is not None:
            minute.add(found)
    state = dashboard.state
    return {
        "now": _iso(time.time()),
        "version": __version__,
        "generation": state.runtime.generation,
        "environments": sorted(state.runtime.environments),
        "last_minute": {
            "requests": minute.classes[3],
            "2xx": minute.classes[0],
            "4xx": minute.classes[1],
            "5xx": minute.classes[2],
            "p50_ms": minute.percentile(0.5),
            "p95_ms": minute.percentile(0.95),
            "rejected": minute.rejected,
        },
        "rejected_since_start": board.traffic.rejected_total,
        "history": {"built": board.built, "audit_lines": board.lines, "bad_lines": board.bad_lines},
    }


def traffic(dashboard: Dashboard, board: Board, request: web.BaseRequest) -> dict[str, Any]:
    window = "24h" if request.query.get("window") == "24h" else "15m"
    return {"window": window, **board.traffic.document(window)}


def spend(dashboard: Dashboard, board: Board, request: web.BaseRequest) -> Any:
    """Spend by user, model, token and environment from the audit lines, and the budgets'
    bars; with [cluster], the bars are every replica's figures, read from Redis."""
    settings = dashboard.state.runtime.settings
    if settings.cluster is not None and settings.budgets:
        return _shared_spend(dashboard, board)
    return _spend(board, "daemon", dashboard.state.budgets.snapshot())


async def _shared_spend(dashboard: Dashboard, board: Board) -> dict[str, Any]:
    state = dashboard.state
    try:
        if state.cluster is None:  # [cluster] in the config, and the node not up yet
            raise ClusterUnavailable("Redis", "not connected yet")
        source, rows = await shared_report(state.runtime.settings, state.cluster)
    except ClusterUnavailable:
        source, rows = "this replica (Redis did not answer)", state.budgets.snapshot()
    return _spend(board, source, rows)


def _spend(board: Board, source: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    budgets = []
    for row in rows:
        limit = row["limit_usd"]
        used = row["spent_usd"] + row["reserved_usd"]
        budgets.append({**row, "used_fraction": round(used / limit, 4) if limit else None})
    return {**board.spend.document(), "budgets": budgets, "budgets_source": source}


def predictions(dashboard: Dashboard, board: Board, request: web.BaseRequest) -> dict[str, Any]:
    return {"predictions": board.predictions()}


def keys(dashboard: Dashboard, board: Board, request: web.BaseRequest) -> dict[str, Any]:
    state = dashboard.state
    settings = state.runtime.settings
    limit = settings.keys.max_age_days
    rows = []
    for name, env in sorted(state.runtime.environments.items()):
        age = state.key_ages.get(name)
        last = board.traffic.last_401.get(name)
        rows.append(
            {
                "environment": name,
                "fingerprint": env.key.fingerprint,
                "source": str(env.settings.key),
                "age_days": age,
                "max_age_days": limit,
                "too_old": age is not None and age > limit,
                "upstream_401": state.metrics.upstream_401.get(name, 0),
                "last_401": None if last is None else _iso(last),
            }
        )
    return {"keys": rows}


def tokens(dashboard: Dashboard, board: Board, request: web.BaseRequest) -> dict[str, Any]:
    registry = dashboard.state.tokens
    rows = []
    for token, used in registry.listing():
        bound = token.user if token.user is not None else None
        rows.append(
            {
                "name": token.name,
                "environments": sorted(token.environments),
                "user": bound,
                "binding": "user" if bound else ("user header" if token.trust_user_header else "token name"),
                "expires": None if token.expires_at == float("inf") else _iso(token.expires_at),
                "last_used": None if used is None else _iso(used),
            }
        )
    return {"file": str(registry.path), "problem": registry.problem, "tokens": rows}


async def webhooks(dashboard: Dashboard, board: Board, request: web.BaseRequest) -> dict[str, Any]:
    state = dashboard.state
    hooks = state.runtime.settings.webhooks
    stats = state.metrics.webhooks
    if hooks is None or stats is None:
        return {"enabled": False}
    dead = await asyncio.to_thread(dead_deliveries, hooks.store)
    age = stats.oldest_pending_age()
    return {
        "enabled": True,
        "outbox_depth": stats.outbox_depth,
        "oldest_pending_s": None if age is None else round(age, 3),
        "delivered": stats.delivered,
        "retried": stats.retried,
        "dead_total": stats.dead,
        "received": stats.received,
        "dead": dead,
    }


def health(dashboard: Dashboard, board: Board, request: web.BaseRequest) -> dict[str, Any]:
    state = dashboard.state
    runtime = state.runtime
    audit = state.audit
    document: dict[str, Any] = {
        "version": __version__,
        "uptime_s": round(time.monotonic() - state.started, 1),
        "config": {
            "path": str(runtime.settings.path),
            "generation": runtime.generation,
            "loaded_at": _iso(runtime.loaded_at.timestamp()),
            "last_reload_error": state.last_reload_error,
        },
        "audit": {
            "path": str(runtime.settings.audit.path),
            "healthy": audit.healthy,
            "queue_depth": audit.depth,
            "written": audit.written,
            "write_failures": audit.write_failures,
            "dropped": audit.dropped,
        },
        "tokens": {"count": len(state.tokens), "problem": state.tokens.problem},
    }
    if state.cluster is not None:
        document["cluster"] = {"degraded": state.cluster.degraded}
    return document


DOCUMENTS: Mapping[str, Build] = {
    "summary": summary,
    "traffic": traffic,
    "spend": spend,
    "predictions": predictions,
    "keys": keys,
    "tokens": tokens,
    "webhooks": webhooks,
    "health": health,
}


# -- the webhook store (blocking: call in a thread) ----------------------------------------


def dead_deliveries(path: Path) -> list[dict[str, Any]]:
    try:
        store = Store(path)
    except StoreError:
        return []
    try:
        rows = store.listing("dead", limit=DEAD_SHOWN)
    finally:
        store.close()
    return [
        {
            "id": row.id,
            "environment": row.environment,
            "prediction_id": row.prediction_id,
            "event": row.event,
            "target": _origin_of(row.target),
            "attempts": row.attempts,
            "received_at": _iso(row.received_at),
            "last_error": row.last_error,
        }
        for row in rows
    ]


def replay(path: Path, event_id: str) -> tuple[str] | str:
    """Queues a dead or delivered event again, as `skyproxy webhooks replay` does; the
    old status, or why not."""
    try:
        store = Store(path)
    except StoreError as exc:
        return str(exc)
    try:
        return (store.replay(event_id, time.time()),)
    except StoreError as exc:
        return str(exc)
    finally:
        store.close()


def _origin_of(url: str) -> str:
    """scheme://host:port: the path or query of an app's webhook URL may hold its secret."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def _iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
