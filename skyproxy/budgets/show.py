"""What `budget show` reports: the running daemon's live figures, else the audit files'.

Only the daemon knows what is reserved by creates in flight; when none answers, spend is
rebuilt from the audit files exactly as a starting daemon would, with nothing reserved.
With [cluster], the figures that admit a create are every replica's, in Redis: they are
read there, by the CLI and by each daemon's `/-/budgets` alike.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from skyproxy.budgets.enforce import Budgets
from skyproxy.budgets.periods import iso, window
from skyproxy.budgets.shared import period_label, subject_from_key
from skyproxy.config import Settings

if TYPE_CHECKING:
    from skyproxy.cluster.url import RedisURL

ENDPOINT = "/-/budgets"


def report(settings: Settings, timeout: float = 5.0) -> tuple[str, list[dict[str, Any]]]:
    """(where the figures come from, one row per budget and subject)."""
    if settings.cluster is not None and settings.budgets:
        return _shared(settings)
    for url in _daemon_urls(settings):
        rows = _ask(url + ENDPOINT, timeout)
        if rows is not None:
            return f"daemon at {url}", rows
    budgets = Budgets(settings.budgets)
    budgets.ledger.replay(settings.audit.path)
    return "audit files (no daemon answered; nothing reserved shown)", budgets.snapshot()


def _daemon_urls(settings: Settings) -> list[str]:
    urls = []
    for env in settings.environments.values():
        for listen in env.listen:
            if listen.port == 0:
                continue
            host = {"0.0.0.0": "127.0.0.1", "localhost": "127.0.0.1", "::": "::1"}.get(
                listen.host, listen.host
            )
            urls.append(f"http://[{host}]:{listen.port}" if ":" in host else f"http://{host}:{listen.port}")
    return urls[:1]  # every listener answers the admin paths; one is enough


def _ask(url: str, timeout: float) -> list[dict[str, Any]] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            body = json.loads(answer.read(1_048_576 * 16))
    except (urllib.error.URLError, OSError, ValueError):
        return None
    rows = body.get("budgets") if isinstance(body, dict) else None
    return rows if isinstance(rows, list) else None


def _shared(settings: Settings) -> tuple[str, list[dict[str, Any]]]:
    import asyncio

    return asyncio.run(shared_report(settings))


async def shared_report(settings: Settings, url: RedisURL | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The current periods' rows from Redis: spend and reservations of every replica.

    `url`: the daemon's, resolved at start (its key source is blocking to read); else it
    is resolved here. Raises `ClusterUnavailable` when Redis does not answer."""
    from skyproxy.cluster.budget_view import shared_usage

    assert settings.cluster is not None
    now = time.time()
    windows = {b.name: (b, *window(b.period, now)) for b in settings.budgets}
    labels = [(name, period_label(b.period, start)) for name, (b, start, _) in windows.items()]
    shown, found = await shared_usage(settings.cluster, labels, url=url)
    rows = [
        {
            "budget": item.budget,
            "per": windows[item.budget][0].per,
            "subject": subject_from_key(item.subject),
            "period": windows[item.budget][0].period,
            "spent_usd": round(item.usage.spent_usd, 9),
            "reserved_usd": round(item.usage.reserved_usd, 9),
            "limit_usd": windows[item.budget][0].usd,
            "resets_at": iso(windows[item.budget][2]),
        }
        for item in found
    ]
    return f"Redis {shown} (every replica)", rows
