"""The dashboard scenario: what an open dashboard costs the proxy.

One skyproxy (every feature on) under wrk at 64 connections, each round measured twice
and interleaved: with nobody watching, and with a poller fetching /-/api/ on the page's
own schedule. The only difference is the poller, so the gap is the dashboard's cost:
answering its documents and reading the audit lines they need.

`python -m bench.dashboard poll --url URL --seconds S` is the poller (on the load core).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from typing import Any

from bench.run import (
    PYTHON,
    ROOT,
    BenchError,
    Env,
    Proc,
    Verdict,
    check_prediction,
    cpu_seconds,
    ratio,
    run_wrk,
    spread,
    start_skyproxy,
    start_upstream_fast,
)

TARGET_DASHBOARD_RATIO = 0.98  # an open dashboard costs at most 2% of throughput
# What the page fetches, and how often (seconds): skyproxy/dashboard/static/app.js.
SCHEDULE = (
    ("summary", 1.0),
    ("traffic?window=15m", 1.0),
    ("predictions", 1.0),
    ("spend", 2.0),
    ("traffic?window=24h", 15.0),
    ("keys", 5.0),
    ("tokens", 5.0),
    ("webhooks", 5.0),
    ("health", 5.0),
)


def poll(url: str, seconds: float) -> dict[str, Any]:
    """Fetches the page's documents on its schedule for `seconds`; counts and sizes."""
    due = {path: 0.0 for path, _ in SCHEDULE}
    started = time.monotonic()
    fetched = failed = size = 0
    while (now := time.monotonic() - started) < seconds:
        for path, every in SCHEDULE:
            if now >= due[path]:
                due[path] = now + every
                try:
                    with urllib.request.urlopen(f"{url}/-/api/{path}", timeout=5) as answer:
                        size += len(answer.read())
                        fetched += 1
                except OSError:
                    failed += 1
        time.sleep(max(0.0, min(due.values()) - (time.monotonic() - started)))
    return {
        "fetched": fetched,
        "failed": failed,
        "bytes": size,
        "seconds": round(time.monotonic() - started, 2),
    }


def scenario_dashboard(env: Env) -> dict[str, Any]:
    args = env.args
    if not env.skyproxy:
        raise BenchError("skyproxy is not available")
    env.check_time("dashboard", 2 * args.rounds * (args.duration + 3) + args.warmup + 10)
    _, up_port, up_kind = start_upstream_fast(env, "upstream-fast")
    proc, port, _ = start_skyproxy(env, "skyproxy-dashboard", up_port)
    url = f"http://127.0.0.1:{port}"
    check = check_prediction(url)
    run_wrk(env, url, 64, args.warmup)
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        this_round: dict[str, Any] = {}
        for watched in (False, True) if r % 2 == 0 else (True, False):
            this_round["open" if watched else "closed"] = _measure(env, proc, url, watched)
        this_round["ratio"] = ratio(this_round["open"]["rps"], this_round["closed"]["rps"])
        rounds.append(this_round)
    env.procs.stop(proc)
    open_rps = spread([x["open"]["rps"] for x in rounds])
    closed_rps = spread([x["closed"]["rps"] for x in rounds])
    return {
        "upstream": up_kind,
        "check": check,
        "rounds": rounds,
        "summary": {
            "closed_rps": closed_rps,
            "open_rps": open_rps,
            "closed_cpu_us": spread([x["closed"]["proxy_cpu_us_per_request"] for x in rounds]),
            "open_cpu_us": spread([x["open"]["proxy_cpu_us_per_request"] for x in rounds]),
            "ratio_per_round": spread([x["ratio"] for x in rounds]),
            "ratio": ratio(open_rps["median"], closed_rps["median"]),
        },
    }


def _measure(env: Env, proc: Proc, url: str, watched: bool) -> dict[str, Any]:
    poller = None
    if watched:
        # Caught up first: an open page reads each audit line once, as it is written, not
        # the backlog of the round before.
        urllib.request.urlopen(f"{url}/-/api/predictions", timeout=30).read()
        cmd = [*env.cpus.prefix(env.cpus.load), PYTHON, "-m", "bench.dashboard", "poll"]
        cmd += ["--url", url, "--seconds", f"{env.args.duration:g}"]
        poller = subprocess.Popen(cmd, cwd=ROOT, env=env.child_env, stdout=subprocess.PIPE)
    cpu = cpu_seconds(proc.pid)
    result = run_wrk(env, url, 64, env.args.duration)
    cpu = cpu_seconds(proc.pid) - cpu
    result["proxy_cpu_us_per_request"] = cpu * 1e6 / result["requests"] if result["requests"] else 0
    if poller is not None:
        out, _ = poller.communicate(timeout=env.args.duration + 30)
        line = next((ln for ln in out.decode().splitlines() if ln.startswith("BENCH_RESULT ")), None)
        if poller.returncode != 0 or line is None:
            raise BenchError(f"the dashboard poller failed ({poller.returncode})")
        result["poller"] = json.loads(line.removeprefix("BENCH_RESULT "))
        if result["poller"]["failed"]:
            raise BenchError(f"{result['poller']['failed']} dashboard fetches failed")
    return result


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    section = results.get("dashboard")
    target = f">= {TARGET_DASHBOARD_RATIO:.2f}x closed"
    name = "dashboard open: throughput (64 conns)"
    if not isinstance(section, dict) or "summary" not in section:
        why = "scenario not run" if section is None else str(section.get("error", "-"))[:120]
        return [Verdict(name, "SKIP", "-", target, why)]
    s = section["summary"]
    errors = sum(x[k]["error_total"] for x in section["rounds"] for k in ("open", "closed"))
    note = (
        f"per round {s['ratio_per_round']['min']:.3f}-{s['ratio_per_round']['max']:.3f}; "
        f"proxy CPU {s['open_cpu_us']['median']:.1f} vs {s['closed_cpu_us']['median']:.1f} µs/request"
        + (f"; {errors} wrk errors" if errors else "")
    )
    ok = s["ratio"] >= TARGET_DASHBOARD_RATIO and not errors
    return [Verdict(name, "PASS" if ok else "FAIL", f"{s['ratio']:.3f}x", target, note)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("poll", help="fetch /-/api/ on the page's schedule")
    p.add_argument("--url", required=True)
    p.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    result = poll(args.url, args.seconds)
    sys.stdout.write("BENCH_RESULT " + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
