"""Prometheus metrics on a registry of the process's own.

The hot path only bumps plain dict entries on the event loop thread; prometheus-client
builds the metric families from them when /-/metrics is scraped. Its own Counter and
Histogram take a lock and run several checks per increment, which showed up as a
fifth of the per-request Python calls skyproxy adds over a bare proxy.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import accumulate
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from skyproxy.webhooks.stats import WebhookStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class UpstreamPool(Protocol):
    """What the metrics read of an environment's upstream connection pool."""

    @property
    def connections(self) -> int: ...

    @property
    def idle(self) -> int: ...

    @property
    def opened_total(self) -> int: ...


class _Latency:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.rejections: dict[tuple[str, str], int] = {}
        self.predictions: dict[tuple[str, str], int] = {}
        self.upstream_429: dict[str, int] = {}
        self.upstream_401: dict[str, int] = {}
        self.latencies: dict[str, _Latency] = {}
        self.clients_closed: dict[tuple[str, str], int] = {}
        self.refusals: dict[tuple[str, str], int] = {}  # (environment, reason): tokens, budgets, caps
        self._budget_warnings: Callable[[], Mapping[str, int]] | None = None
        self._audit: tuple[Callable[[], float], Callable[[], float], Callable[[], float]] | None = None
        self._upstream: Callable[[], Mapping[str, UpstreamPool]] | None = None
        self.webhooks: WebhookStats | None = None
        self._cluster: tuple[Callable[[], float], Callable[[], bool]] | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)  # process_open_fds, process_max_fds, memory, CPU

    def watch_audit(
        self, depth: Callable[[], float], failures: Callable[[], float], dropped: Callable[[], float]
    ) -> None:
        self._audit = (depth, failures, dropped)

    def watch_upstream(self, pools: Callable[[], Mapping[str, UpstreamPool]]) -> None:
        """`pools()` gives each environment's upstream pool, read at scrape time."""
        self._upstream = pools

    def watch_webhooks(self, stats: WebhookStats) -> None:
        self.webhooks = stats

    def watch_cluster(self, errors: Callable[[], float], degraded: Callable[[], bool]) -> None:
        """The shared Redis: calls that failed, and whether it is unavailable now."""
        self._cluster = (errors, degraded)

    def request(self, environment: str, route: str, status: int) -> None:
        key = (environment, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def latency(self, environment: str, seconds: float) -> None:
        found = self.latencies.get(environment)
        if found is None:
            found = self.latencies[environment] = _Latency()
        found.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        found.total += seconds

    def rejected(self, rule: str, scope: str) -> None:
        key = (rule, scope)
        self.rejections[key] = self.rejections.get(key, 0) + 1

    def prediction(self, environment: str, status: str) -> None:
        key = (environment, status)
        self.predictions[key] = self.predictions.get(key, 0) + 1

    def refused(self, environment: str, reason: str) -> None:
        """A request refused for who sent it or what it would spend: the error code is the reason."""
        key = (environment, reason)
        self.refusals[key] = self.refusals.get(key, 0) + 1

    def watch_budgets(self, warnings: Callable[[], Mapping[str, int]]) -> None:
        """`warnings()` gives each budget's warn_at crossings, read at scrape time."""
        self._budget_warnings = warnings

    def upstream_rate_limited(self, environment: str) -> None:
        self.upstream_429[environment] = self.upstream_429.get(environment, 0) + 1

    def upstream_unauthorized(self, environment: str) -> None:
        self.upstream_401[environment] = self.upstream_401.get(environment, 0) + 1

    def client_closed(self, listener: tuple[str, int], reason: str) -> None:
        """A client connection the daemon closed itself: header_timeout, shed or refused."""
        key = (f"{listener[0]}:{listener[1]}", reason)
        self.clients_closed[key] = self.clients_closed.get(key, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def families(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "skyproxy_requests", "Requests answered", labels=["environment", "route", "status"]
        )
        for (environment, route, status), count in sorted(self.requests.items()):
            requests.add_metric([environment, route, str(status)], count)
        yield requests
        latency = HistogramMetricFamily(
            "skyproxy_upstream_latency_seconds",
            "Upstream round trip, to the end of the body",
            labels=["environment"],
        )
        bounds = [*(floatToGoString(b) for b in LATENCY_BUCKETS), "+Inf"]
        for environment, found in sorted(self.latencies.items()):
            cumulative = list(accumulate(found.counts))
            latency.add_metric([environment], list(zip(bounds, cumulative, strict=True)), found.total)
        yield latency
        yield _counter(
            "skyproxy_rate_limit_rejections",
            "Requests refused by a limit",
            ["rule", "scope"],
            self.rejections.items(),
        )
        yield _counter(
            "skyproxy_predictions",
            "Prediction events audited",
            ["environment", "status"],
            self.predictions.items(),
        )
        yield _counter(
            "skyproxy_upstream_rate_limited",
            "Upstream 429 answers passed through",
            ["environment"],
            (((k,), v) for k, v in self.upstream_429.items()),
        )
        yield _counter(
            "skyproxy_upstream_unauthorized",
            "Upstream 401 answers: the key was rejected",
            ["environment"],
            (((k,), v) for k, v in self.upstream_401.items()),
        )
        yield _counter(
            "skyproxy_client_connections_closed",
            "Client connections closed by the daemon: slow heads, shed for room, refused when full; "
            "request_dropped: a request on one of them that was not forwarded",
            ["listener", "reason"],
            self.clients_closed.items(),
        )
        yield _counter(
            "skyproxy_client_refusals",
            "Requests refused by reason: token_required, invalid_token, token_not_allowed, "
            "budget_exceeded, too_many_in_flight",
            ["environment", "reason"],
            self.refusals.items(),
        )
        if self._budget_warnings is not None:
            yield _counter(
                "skyproxy_budget_warnings",
                "Subjects that crossed a budget's warn_at, once per period",
                ["budget"],
                (((k,), v) for k, v in self._budget_warnings().items()),
            )
        if self._upstream is not None:
            yield from _upstream_families(self._upstream())
        if self.webhooks is not None:
            yield from _webhook_families(self.webhooks)
        if self._cluster is not None:
            errors, degraded = self._cluster
            yield CounterMetricFamily(
                "skyproxy_cluster_errors",
                "Calls to the shared Redis that failed or timed out",
                value=errors(),
            )
            yield GaugeMetricFamily(
                "skyproxy_cluster_degraded", "1 while the shared Redis is unavailable", float(degraded())
            )
        if self._audit is not None:
            depth, failures, dropped = self._audit
            yield GaugeMetricFamily(
                "skyproxy_audit_queue_depth", "Audit lines waiting for the writer", depth()
            )
            yield GaugeMetricFamily(
                "skyproxy_audit_write_failures", "Audit writes that failed (retried)", failures()
            )
            yield GaugeMetricFamily(
                "skyproxy_audit_dropped", "Audit lines refused because the queue was full", dropped()
            )


def _upstream_families(pools: Mapping[str, UpstreamPool]) -> Iterator[Metric]:
    connections = GaugeMetricFamily(
        "skyproxy_upstream_connections",
        "Connections to the upstream: in use, or idle and kept alive",
        labels=["environment", "state"],
    )
    for environment, pool in pools.items():
        idle = pool.idle
        connections.add_metric([environment, "idle"], idle)
        connections.add_metric([environment, "active"], pool.connections - idle)
    yield connections
    yield _counter(
        "skyproxy_upstream_connections_opened",
        "Connections opened to the upstream; far fewer than requests when keep-alive works",
        ["environment"],
        (((environment,), pool.opened_total) for environment, pool in pools.items()),
    )


def _webhook_families(stats: WebhookStats) -> Iterator[Metric]:
    for name, documentation, value in (
        ("received", "Webhook events verified and stored", stats.received),
        (
            "refused_signature",
            "Webhook requests refused for a missing or wrong signature",
            stats.refused_signature,
        ),
        ("duplicates", "Webhook events received again, not relayed again", stats.duplicates),
        ("delivered", "Webhook deliveries the app answered 2xx to", stats.delivered),
        ("retried", "Webhook delivery attempts that failed and were rescheduled", stats.retried),
        ("dead", "Webhook deliveries given up after the retry schedule", stats.dead),
        ("gone", "Webhook deliveries dropped because their target answered 410", stats.gone),
    ):
        yield CounterMetricFamily(f"skyproxy_webhooks_{name}", documentation, value=value)
    yield GaugeMetricFamily(
        "skyproxy_webhooks_outbox_depth", "Webhook deliveries pending in the store", stats.outbox_depth
    )
    age = stats.oldest_pending_age()
    yield GaugeMetricFamily(
        "skyproxy_webhooks_oldest_pending_seconds", "Age of the oldest pending delivery", age or 0.0
    )


def _counter(
    name: str, documentation: str, labels: list[str], values: Iterable[tuple[tuple[str, ...], int]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, count in sorted(values):
        family.add_metric(list(key), count)
    return family


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.families()


def route_of(path: str) -> str:
    """A bounded route label: ids are folded so that label cardinality stays small."""
    if path.startswith("/v1/predictions/"):
        return "/v1/predictions/{id}/cancel" if path.endswith("/cancel") else "/v1/predictions/{id}"
    if path in _KNOWN:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{slug}"
    return "other"


_KNOWN = frozenset(
    {
        "/v1/predictions",
        "/v1/predict",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/embeddings",
    }
)
