"""The metrics collector: plain counts on the hot path, Prometheus text at scrape time."""

from __future__ import annotations

from helpers import env_config
from prometheus_client.parser import text_string_to_metric_families

from skyproxy.ops.metrics import Metrics, route_of


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_counters_and_histogram_render_as_prometheus_text() -> None:
    m = Metrics()
    for status in (201, 201, 429):
        m.request("dev", "/v1/predictions", status)
    for seconds in (0.003, 0.02, 0.02, 7.0, 500.0):
        m.latency("dev", seconds)
    m.rejected("predictions", "user")
    m.prediction("dev", "created")
    m.upstream_unauthorized("prod")
    m.watch_audit(lambda: 3, lambda: 1, lambda: 0)
    found = samples(m)
    key = (("environment", "dev"), ("route", "/v1/predictions"), ("status", "201"))
    assert found[("skyproxy_requests_total", key)] == 2
    bucket = "skyproxy_upstream_latency_seconds_bucket"
    assert found[(bucket, (("environment", "dev"), ("le", "0.005")))] == 1
    assert found[(bucket, (("environment", "dev"), ("le", "0.025")))] == 3  # cumulative
    assert found[(bucket, (("environment", "dev"), ("le", "10.0")))] == 4
    assert found[(bucket, (("environment", "dev"), ("le", "+Inf")))] == 5
    assert found[("skyproxy_upstream_latency_seconds_count", (("environment", "dev"),))] == 5
    assert abs(found[("skyproxy_upstream_latency_seconds_sum", (("environment", "dev"),))] - 507.043) < 1e-9
    assert found[("skyproxy_rate_limit_rejections_total", (("rule", "predictions"), ("scope", "user")))] == 1
    assert found[("skyproxy_predictions_total", (("environment", "dev"), ("status", "created")))] == 1
    assert found[("skyproxy_upstream_unauthorized_total", (("environment", "prod"),))] == 1
    assert found[("skyproxy_audit_queue_depth", ())] == 3
    assert found[("skyproxy_audit_write_failures", ())] == 1


def test_a_bucket_bound_is_inclusive() -> None:
    m = Metrics()
    m.latency("dev", 0.005)
    found = samples(m)
    assert found[("skyproxy_upstream_latency_seconds_bucket", (("environment", "dev"), ("le", "0.005")))] == 1


def test_route_labels_fold_ids() -> None:
    assert route_of("/v1/predictions/abc") == "/v1/predictions/{id}"
    assert route_of("/v1/predictions/abc/cancel") == "/v1/predictions/{id}/cancel"
    assert route_of("/v1/models/truefusion") == "/v1/models/{slug}"
    assert route_of("/v1/anything/else") == "other"


async def test_upstream_pool_gauges_show_keep_alive_at_work(mock_upstream, start_proxy, canary_env) -> None:
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url))
    for _ in range(5):
        async with proxy.session.get(f"{proxy.url}/v1/models") as r:
            assert r.status == 200
    async with proxy.session.get(f"{proxy.url}/-/metrics") as r:
        text = await r.text()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    dev = (("environment", "dev"),)
    assert len(state.seen) == 5
    assert found[("skyproxy_upstream_connections_opened_total", dev)] == 1  # one, kept alive
    assert found[("skyproxy_upstream_connections", (*dev, ("state", "idle")))] == 1
    assert found[("skyproxy_upstream_connections", (*dev, ("state", "active")))] == 0


def test_refusals_by_reason_and_budget_warnings() -> None:
    m = Metrics()
    for reason in ("invalid_token", "invalid_token", "budget_exceeded", "too_many_in_flight"):
        m.refused("dev", reason)
    warnings = {"daily": 2}
    m.watch_budgets(lambda: warnings)
    found = samples(m)
    refusals = "skyproxy_client_refusals_total"
    assert found[(refusals, (("environment", "dev"), ("reason", "invalid_token")))] == 2
    assert found[(refusals, (("environment", "dev"), ("reason", "budget_exceeded")))] == 1
    assert found[("skyproxy_budget_warnings_total", (("budget", "daily"),))] == 2
    warnings["daily"] = 3  # read at scrape time
    assert samples(m)[("skyproxy_budget_warnings_total", (("budget", "daily"),))] == 3
