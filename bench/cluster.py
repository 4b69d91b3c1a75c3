"""The redis scenario: skyproxy with `[cluster]` on a loopback redis-server against the
local limiter, interleaved round by round in the same run.

Both targets have every feature on (guard, limits, audit, metrics); the only difference is
the `[cluster]` table, so the gap is what sharing the limits through Redis costs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

from bench.run import (
    BenchError,
    Env,
    Proc,
    Verdict,
    check_prediction,
    cpu_seconds,
    fmt_spread,
    free_port,
    http,
    ratio,
    run_wrk,
    scrape_metrics,
    spread,
    start_skyproxy,
    start_upstream_fast,
)

TARGET_ADDED_P50_MS = 0.25
TARGET_CLUSTER_THROUGHPUT_RATIO = 0.7
# The added p50 is the difference of two p50s that each move by about 100 µs from round
# to round on a shared 2-core VM, where the target is 250 µs: the median of 3 rounds lands
# on either side of it for the same code. So this scenario takes at least this many.
MIN_ROUNDS = 9

CLUSTER_TABLE = """
[cluster]
redis = "redis://127.0.0.1:{port}/0"
on_error = "closed"
timeout_ms = 50
prefix = "bench:"
"""


def start_redis(env: Env) -> tuple[Proc, int]:
    """redis-server on a free loopback port in the run's temp dir, without persistence,
    on the load core (beside wrk and the upstream) so the proxy keeps its core alone."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    folder = env.workdir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "redis.conf"
    conf.write_text(
        f'port {port}\nbind 127.0.0.1\ndir {folder}\nsave ""\nappendonly no\ndaemonize no\n'
        f"logfile {folder / 'redis.log'}\n"
    )
    proc = env.procs.start("redis", [binary, str(conf)], env.cpus.load, env.cpus, env.child_env)
    return proc, port


def redis_rtt_us(env: Env, port: int) -> float | None:
    """redis-benchmark's p50 for PING at one connection, from the proxy's core to Redis on
    the load core: the round trip skyproxy's Redis path pays, with no Python in it. The
    floor beside the added p50."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    ping = ["-p", str(port), "-n", "10000", "-c", "1", "-t", "ping", "-q"]
    cmd = [*env.cpus.prefix(env.cpus.proxy), binary, *ping]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env.child_env)
    found = re.findall(r"PING_MBULK: .*?p50=([0-9.]+) msec", out.stdout)
    return float(found[-1]) * 1000 if found else None


def scenario_redis(env: Env) -> dict[str, Any]:
    """req/s at 64 connections and p50 at 1, local limiter vs `[cluster]` on Redis."""
    args = env.args
    if not env.skyproxy:
        raise BenchError("skyproxy is not available")
    rounds_wanted = args.rounds if args.quick else max(args.rounds, MIN_ROUNDS)
    env.check_time("redis", 2 * (rounds_wanted * (2 * args.duration + 3) + args.warmup))
    _, up_port, up_kind = start_upstream_fast(env, "upstream-fast")
    redis_proc, redis_port = start_redis(env)
    targets: dict[str, tuple[Proc, int]] = {}
    local_proc, local_port, _ = start_skyproxy(env, "skyproxy-local", up_port)
    targets["local"] = (local_proc, local_port)
    # /-/health answers 503 under on_error = "closed" until Redis answers: ready means connected.
    redis_sky, redis_sky_port, _ = start_skyproxy(
        env, "skyproxy-redis", up_port, extra=CLUSTER_TABLE.format(port=redis_port)
    )
    targets["redis"] = (redis_sky, redis_sky_port)
    checks = {name: check_prediction(f"http://127.0.0.1:{port}") for name, (_, port) in targets.items()}
    for _, port in targets.values():
        run_wrk(env, f"http://127.0.0.1:{port}", 64, args.warmup)
    rtt_us = redis_rtt_us(env, redis_port)

    names = list(targets)
    rounds: list[dict[str, Any]] = []
    for r in range(rounds_wanted):
        this_round: dict[str, Any] = {}
        for name in names[r % 2 :] + names[: r % 2]:
            proc, port = targets[name]
            url = f"http://127.0.0.1:{port}"
            cpu0 = cpu_seconds(proc.pid)
            high = run_wrk(env, url, 64, args.duration)
            high["proxy_cpu_us_per_request"] = (
                (cpu_seconds(proc.pid) - cpu0) * 1e6 / high["requests"] if high["requests"] else 0
            )
            low = run_wrk(env, url, 1, args.duration)
            this_round[name] = {"c64": high, "c1": low}
        rounds.append(this_round)
    return {**_summarise(env, targets, redis_proc, rounds, up_kind, checks), "redis_ping_p50_us": rtt_us}


def _summarise(
    env: Env,
    targets: dict[str, tuple[Proc, int]],
    redis_proc: Proc,
    rounds: list[dict[str, Any]],
    up_kind: str,
    checks: dict[str, Any],
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in targets:
        rs = [rd[name] for rd in rounds]
        summary[name] = {
            "rps_c64": spread([x["c64"]["rps"] for x in rs]),
            "cpu_us_per_request_c64": spread([x["c64"]["proxy_cpu_us_per_request"] for x in rs]),
            "p50_us_c1": spread([x["c1"]["latency_us"]["p50"] for x in rs]),
            "p99_us_c1": spread([x["c1"]["latency_us"]["p99"] for x in rs]),
            "errors": sum(x["c64"]["error_total"] + x["c1"]["error_total"] for x in rs),
        }
    added = [
        (rd["redis"]["c1"]["latency_us"]["p50"] - rd["local"]["c1"]["latency_us"]["p50"]) for rd in rounds
    ]
    metrics = scrape_metrics(f"http://127.0.0.1:{targets['redis'][1]}")
    cluster = _cluster_status(f"http://127.0.0.1:{targets['redis'][1]}")
    for proc, _ in targets.values():
        env.procs.stop(proc)
    env.procs.stop(redis_proc)
    return {
        "upstream": up_kind,
        "checks": checks,
        "rounds": rounds,
        "summary": summary,
        "added_p50_us_c1": spread(added),
        "added_p50_us_c1_rounds": added,
        "added_p50_us_c1_median_of_medians": (
            summary["redis"]["p50_us_c1"]["median"] - summary["local"]["p50_us_c1"]["median"]
        ),
        "throughput_ratio": ratio(
            summary["redis"]["rps_c64"]["median"], summary["local"]["rps_c64"]["median"]
        ),
        "throughput_ratio_per_round": spread(
            [rd["redis"]["c64"]["rps"] / rd["local"]["c64"]["rps"] for rd in rounds]
        ),
        "redis_metrics": metrics,
        "cluster_status": cluster,
    }


def _cluster_status(base: str) -> dict[str, Any]:
    """The proxy's own count of failed Redis calls and outages: tells a refusal by
    `on_error` from any other wrk error."""
    try:
        _, body = http("GET", base + "/-/status")
        found = json.loads(body).get("cluster")
    except (OSError, ValueError) as exc:
        return {"error": repr(exc)}
    return found if isinstance(found, dict) else {"error": "no cluster in /-/status"}


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    section = results.get("redis")
    t_p50 = f"<= {TARGET_ADDED_P50_MS:.2f} ms over local"
    t_tp = f">= {TARGET_CLUSTER_THROUGHPUT_RATIO:.2f}x local"
    if not isinstance(section, dict) or "summary" not in section:
        why = "scenario not run" if section is None else str(section.get("error", "-"))[:120]
        return [
            Verdict("redis: added p50 (1 conn)", "SKIP", "-", t_p50, why),
            Verdict("redis: throughput (64 conns)", "SKIP", "-", t_tp, why),
        ]
    errors = section["summary"]["redis"]["errors"] + section["summary"]["local"]["errors"]
    added_ms = section["added_p50_us_c1"]["median"] / 1000
    per = section["added_p50_us_c1"]
    note = f"per round {per['min'] / 1000:.3f}-{per['max'] / 1000:.3f} ms" + (
        f"; {errors} wrk errors" if errors else ""
    )
    ok = added_ms <= TARGET_ADDED_P50_MS and not errors
    out = [Verdict("redis: added p50 (1 conn)", "PASS" if ok else "FAIL", f"{added_ms:.3f} ms", t_p50, note)]
    tp = section["throughput_ratio"]
    per = section["throughput_ratio_per_round"]
    ok = tp >= TARGET_CLUSTER_THROUGHPUT_RATIO and not errors
    note = f"per round {per['min']:.2f}-{per['max']:.2f}" + (f"; {errors} wrk errors" if errors else "")
    out.append(Verdict("redis: throughput (64 conns)", "PASS" if ok else "FAIL", f"{tp:.2f}x", t_tp, note))
    return out


def print_report(results: dict[str, Any]) -> None:
    section = results.get("redis")
    if not isinstance(section, dict):
        return
    if "summary" not in section:
        print(f"redis: ERROR {str(section.get('error', '-')).splitlines()[0]}")
        return
    print("\nredis: skyproxy with [cluster] on a loopback redis-server vs the local limiter, all features on")
    print(f"{'target':<8}{'req/s @64 conns':>26}{'proxy CPU µs/req @64':>24}{'p50 µs @1 conn':>20}  errors")
    for name, s in section["summary"].items():
        print(
            f"{name:<8}{fmt_spread(s['rps_c64']):>26}{fmt_spread(s['cpu_us_per_request_c64']):>24}"
            f"{fmt_spread(s['p50_us_c1']):>20}  {s['errors']}"
        )
    print(
        f"  added p50 at 1 conn (paired per round): {fmt_spread(section['added_p50_us_c1'])} µs; "
        f"throughput {section['throughput_ratio']:.2f}x local"
    )
    added = section.get("added_p50_us_c1_rounds")
    if added:
        print(f"  added p50 per round, in order: {', '.join(f'{a:,.0f}' for a in added)} µs")
    cluster = section.get("cluster_status", {})
    if "errors_total" in cluster:
        print(
            f"  Redis calls failed (skyproxy_cluster_errors_total): {cluster['errors_total']}, "
            f"outages: {cluster['outages_total']}"
        )
    rtt = section.get("redis_ping_p50_us")
    if rtt is not None:
        print(f"  floor: redis-benchmark PING p50 at 1 conn, proxy core to Redis core: {rtt:.0f} µs")
