"""Prometheus metrics on a registry of the process's own, with label lookups cached."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "skyproxy_requests", "Requests answered", ["environment", "route", "status"], registry=r
        )
        self._latency = Histogram(
            "skyproxy_upstream_latency_seconds",
            "Upstream round trip, to the end of the body",
            ["environment"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._rejections = Counter(
            "skyproxy_rate_limit_rejections",
            "Requests refused by a limit",
            ["rule", "scope"],
            registry=r,
        )
        self._predictions = Counter(
            "skyproxy_predictions",
            "Prediction events audited",
            ["environment", "status"],
            registry=r,
        )
        self._upstream_429 = Counter(
            "skyproxy_upstream_rate_limited",
            "Upstream 429 answers passed through",
            ["environment"],
            registry=r,
        )
        self._upstream_401 = Counter(
            "skyproxy_upstream_unauthorized",
            "Upstream 401 answers: the key was rejected",
            ["environment"],
            registry=r,
        )
        self.audit_queue_depth = Gauge(
            "skyproxy_audit_queue_depth", "Audit lines waiting for the writer", registry=r
        )
        self.audit_write_failures = Gauge(
            "skyproxy_audit_write_failures", "Audit writes that failed (retried)", registry=r
        )
        self.audit_dropped = Gauge(
            "skyproxy_audit_dropped", "Audit lines refused because the queue was full", registry=r
        )
        self._cache: dict[tuple[object, ...], Callable[..., None]] = {}

    def watch_audit(
        self,
        depth: Callable[[], float],
        failures: Callable[[], float],
        dropped: Callable[[], float],
    ) -> None:
        self.audit_queue_depth.set_function(depth)
        self.audit_write_failures.set_function(failures)
        self.audit_dropped.set_function(dropped)

    def request(self, environment: str, route: str, status: int) -> None:
        key = ("r", environment, route, status)
        inc = self._cache.get(key)
        if inc is None:
            inc = self._cache[key] = self._requests.labels(environment, route, str(status)).inc
        inc()

    def latency(self, environment: str, seconds: float) -> None:
        key = ("l", environment)
        observe = self._cache.get(key)
        if observe is None:
            observe = self._cache[key] = self._latency.labels(environment).observe
        observe(seconds)

    def rejected(self, rule: str, scope: str) -> None:
        key = ("x", rule, scope)
        inc = self._cache.get(key)
        if inc is None:
            inc = self._cache[key] = self._rejections.labels(rule, scope).inc
        inc()

    def prediction(self, environment: str, status: str) -> None:
        key = ("p", environment, status)
        inc = self._cache.get(key)
        if inc is None:
            inc = self._cache[key] = self._predictions.labels(environment, status).inc
        inc()

    def upstream_rate_limited(self, environment: str) -> None:
        self._upstream_429.labels(environment).inc()

    def upstream_unauthorized(self, environment: str) -> None:
        self._upstream_401.labels(environment).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
