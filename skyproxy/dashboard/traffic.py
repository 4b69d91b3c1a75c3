"""Live traffic: the daemon's counters sampled once a second into two rings.

The proxy already counts every request, limit rejection and upstream latency for
/-/metrics. Sampling those totals once a second and keeping the differences costs the
hot path nothing: the last 15 minutes at one point a second, the last 24 hours at one
point a minute. Before the process started, the points come from the audit trail.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping

from skyproxy.ops.metrics import LATENCY_BUCKETS, Metrics

SHORT_POINTS = 900  # 15 minutes of seconds
LONG_POINTS = 1440  # 24 hours of minutes
UPSTREAM_RULE = "upstream 429"  # answers the upstream limited, passed through
Row = tuple[float, int, int, int, float | None, float | None]


class Bucket:
    """The requests of one second or minute: by status class, latency histogram, 429s by rule."""

    __slots__ = ("_percentiles", "_row", "classes", "latency", "rejected")

    def __init__(self) -> None:
        self.classes = [0, 0, 0, 0]  # 2xx (and 1xx/3xx), 4xx, 5xx, all
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.rejected: dict[str, int] = {}
        self._percentiles: dict[float, float | None] = {}  # a closed bucket's are asked for often
        self._row: tuple[int, Row] | None = None

    def row(self, step: int) -> Row:
        """Its point on the charts: (rps, 2xx, 4xx, 5xx, p50, p95), kept until it changes:
        a document has a point for every second of 15 minutes, nearly all of them closed."""
        if self._row is None or self._row[0] != step:
            c = self.classes
            values = (round(c[3] / step, 3), c[0], c[1], c[2], self.percentile(0.50), self.percentile(0.95))
            self._row = (step, values)
        return self._row[1]

    def add(self, other: Bucket) -> None:
        self._percentiles = {}
        self._row = None
        for i, n in enumerate(other.classes):
            self.classes[i] += n
        for i, n in enumerate(other.latency):
            self.latency[i] += n
        for rule, n in other.rejected.items():
            self.rejected[rule] = self.rejected.get(rule, 0) + n

    def request(self, status: int, latency_s: float | None) -> None:
        self._percentiles = {}
        self._row = None
        self.classes[3] += 1
        self.classes[2 if status >= 500 else 1 if status >= 400 else 0] += 1
        if latency_s is not None:
            self.latency[bisect_left(LATENCY_BUCKETS, latency_s)] += 1

    def percentile(self, fraction: float) -> float | None:
        """Milliseconds, interpolated inside the histogram bucket the rank falls in."""
        if fraction not in self._percentiles:
            self._percentiles[fraction] = self._percentile(fraction)
        return self._percentiles[fraction]

    def _percentile(self, fraction: float) -> float | None:
        total = sum(self.latency)
        if total == 0:
            return None
        rank = fraction * total
        seen = 0
        for i, n in enumerate(self.latency):
            if n and seen + n >= rank:
                low = LATENCY_BUCKETS[i - 1] if i > 0 else 0.0
                high = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else low * 2
                return round(1000 * (low + (high - low) * (rank - seen) / n), 1)
            seen += n
        return None


class Traffic:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.short: dict[int, Bucket] = {}  # second -> bucket
        self.long: dict[int, Bucket] = {}  # minute start (seconds) -> bucket
        self.rejected_total: dict[str, int] = {}  # since the process started
        self.last_401: dict[str, float] = {}  # environment -> when an upstream 401 was last seen
        self._last = self._totals()

    def sample(self, now: float | None = None) -> None:
        """Takes the counters' movement since the last sample as the second that just ended."""
        now = time.time() if now is None else now
        totals = self._totals()
        bucket = _difference(totals, self._last)
        for environment, count in totals[3].items():
            if count > self._last[3].get(environment, 0):
                self.last_401[environment] = now
        self._last = totals
        for rule, n in bucket.rejected.items():
            self.rejected_total[rule] = self.rejected_total.get(rule, 0) + n
        if not bucket.classes[3] and not bucket.rejected:
            return  # a quiet second: the documents show zeros where nothing is kept
        second = int(now) - 1
        self._put(self.short, second, bucket, second - SHORT_POINTS)
        self._put(self.long, second - second % 60, bucket, second - LONG_POINTS * 60)

    def seed(self, seconds: Mapping[int, Bucket], minutes: Mapping[int, Bucket]) -> None:
        """Points from the audit trail, for the time before this process counted."""
        for second, bucket in seconds.items():
            self._put(self.short, second, bucket, int(time.time()) - SHORT_POINTS)
        for minute, bucket in minutes.items():
            self._put(self.long, minute, bucket, int(time.time()) - LONG_POINTS * 60)

    def document(self, window: str, now: float | None = None) -> dict[str, object]:
        now = time.time() if now is None else now
        if window == "24h":
            return _columns(self.long, 60, int(now) // 60 * 60 - (LONG_POINTS - 1) * 60, LONG_POINTS)
        return _columns(self.short, 1, int(now) - SHORT_POINTS, SHORT_POINTS)

    def _put(self, ring: dict[int, Bucket], at: int, bucket: Bucket, oldest: int) -> None:
        found = ring.get(at)
        if found is None:
            found = ring[at] = Bucket()
            if len(ring) > LONG_POINTS + 60:  # a prune now and then, not a scan per second
                for stale in [t for t in ring if t < oldest]:
                    del ring[stale]
        found.add(bucket)

    def _totals(
        self,
    ) -> tuple[dict[int, int], list[int], dict[str, int], dict[str, int]]:
        m = self._metrics
        classes: dict[int, int] = {}
        for (_, _, status), n in m.requests.items():
            classes[status] = classes.get(status, 0) + n
        latency = [0] * (len(LATENCY_BUCKETS) + 1)
        for found in list(m.latencies.values()):
            for i, n in enumerate(found.counts):
                latency[i] += n
        rejected: dict[str, int] = {}
        for (rule, _), n in m.rejections.items():
            rejected[rule] = rejected.get(rule, 0) + n
        upstream = sum(m.upstream_429.values())
        if upstream:
            rejected[UPSTREAM_RULE] = upstream
        return classes, latency, rejected, dict(m.upstream_401)


def _difference(
    now: tuple[dict[int, int], list[int], dict[str, int], dict[str, int]],
    before: tuple[dict[int, int], list[int], dict[str, int], dict[str, int]],
) -> Bucket:
    bucket = Bucket()
    for status, n in now[0].items():
        moved = n - before[0].get(status, 0)
        if moved > 0:
            bucket.classes[3] += moved
            bucket.classes[2 if status >= 500 else 1 if status >= 400 else 0] += moved
    bucket.latency = [max(a - b, 0) for a, b in zip(now[1], before[1], strict=True)]
    for rule, n in now[2].items():
        moved = n - before[2].get(rule, 0)
        if moved > 0:
            bucket.rejected[rule] = moved
    return bucket


def _columns(ring: Mapping[int, Bucket], step: int, first: int, points: int) -> dict[str, object]:
    """Columns for the charts: one entry per step, zeros where nothing happened."""
    times = [first + i * step for i in range(points)]
    empty = Bucket()
    rows = [ring.get(t, empty) for t in times]
    rps, ok, client, server, p50, p95 = (
        list(column) for column in zip(*(r.row(step) for r in rows), strict=True)
    )
    limited = [r for r in rows if r.rejected]
    rules = sorted({rule for row in limited for rule in row.rejected})
    return {
        "step": step,
        "t": times,
        "rps": rps,
        "2xx": ok,
        "4xx": client,
        "5xx": server,
        "p50": p50,
        "p95": p95,
        "rejected": {rule: [r.rejected.get(rule, 0) for r in rows] for rule in rules},
        "rejected_total": _sum_rules(limited),
    }


def _sum_rules(rows: Iterable[Bucket]) -> dict[str, int]:
    total: dict[str, int] = {}
    for row in rows:
        for rule, n in row.rejected.items():
            total[rule] = total.get(rule, 0) + n
    return total
