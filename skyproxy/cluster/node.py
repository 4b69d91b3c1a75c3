"""This replica's part in the cluster: one connection and the backends built on it.

The daemon's supervisor starts it before binding (a Redis that is down then starts an
outage, it does not stop the daemon) and closes it after the relays have finished.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from skyproxy.cluster import budgets, inflight, webhooks
from skyproxy.cluster.budgets import RedisBudgets
from skyproxy.cluster.connection import RedisConnection
from skyproxy.cluster.inflight import RedisInFlight
from skyproxy.cluster.rates import RedisRates
from skyproxy.cluster.terminals import RedisTerminals
from skyproxy.cluster.url import RedisURL, resolve_url
from skyproxy.cluster.webhooks import RedisWebhooks
from skyproxy.config import ClusterSettings

__all__ = ["ClusterNode"]


class ClusterNode:
    """The shared rates, in-flight caps, budgets, webhook claims and terminal lines of one replica."""

    def __init__(
        self,
        settings: ClusterSettings,
        url: RedisURL,
        *,
        inflight_lease_s: float = inflight.DEFAULT_LEASE_S,
        budget_lease_s: float = budgets.DEFAULT_LEASE_S,
        claim_lease_s: float = webhooks.DEFAULT_CLAIM_LEASE_S,
    ) -> None:
        self.settings = settings
        self.connection = RedisConnection(
            url, on_error=settings.on_error, timeout_ms=settings.timeout_ms, prefix=settings.prefix
        )
        self.rates = RedisRates(self.connection)
        self.inflight = RedisInFlight(self.connection, lease_s=inflight_lease_s)
        self.budgets = RedisBudgets(self.connection, lease_s=budget_lease_s)
        self.webhooks = RedisWebhooks(self.connection, claim_lease_s=claim_lease_s)
        self.terminals = RedisTerminals(self.connection)

    @classmethod
    def from_settings(cls, settings: ClusterSettings, environ: Mapping[str, str] = os.environ) -> ClusterNode:
        """Resolves the URL from its key source; a `KeySourceError` never holds it."""
        return cls(settings, resolve_url(settings, environ))

    def __repr__(self) -> str:
        return f"ClusterNode({self.connection!r})"

    @property
    def degraded(self) -> bool:
        return self.connection.degraded

    @property
    def refuses(self) -> bool:
        """Whether limited requests are refused now: /-/health answers 503 then."""
        return self.connection.degraded and not self.connection.fails_open

    def status(self) -> dict[str, Any]:
        queues = (self.inflight.queued, self.budgets.queued)
        return {
            **self.connection.status(),
            "in_flight_leases": self.inflight.held,
            # Releases and spend waiting for Redis, and those dropped (their leases run out).
            "queued_calls": sum(q.pending for q in queues),
            "queued_calls_lost": sum(q.lost for q in queues),
        }

    async def start(self) -> None:
        await self.connection.start()
        self.inflight.start()
        self.budgets.start()

    async def close(self) -> None:
        await self.inflight.stop()
        await self.budgets.stop()
        await self.connection.close()
