"""The dashboard scenario: what an open dashboard costs the proxy.

One skyproxy (every feature on) under wrk at 64 connections, each round measured twice
and interleaved: with nobody watching, and with a poller fetching /-/api/ on the page's
own schedule. The only difference is the poller, so the gap is the dashboard's cost:
answering its documents and reading the audit lines they need.

`dashboard-instructions`, the deterministic measure of the same cost: the proxy under
callgrind counts the instructions of N priced creates with no page open and, alternately,
of N more with the page open (every audit line read and counted by the dashboard inside
the counted phase), then of the page's documents over `PAGE_SECONDS` of its schedule. The
lines' share is each open phase against the closed ones either side (the median); the
documents' is their instructions per page-second over those of the requests the proxy
serves in a second at its saturated rate, measured by wrk in the same run.

`python -m bench.dashboard poll --url URL --seconds S` is the poller (on the load core);
`python -m bench.dashboard lines` times reading one audit line (the micro-benchmark).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
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
TARGET_DASHBOARD_COST = 1.02  # instructions per request, page open / no page
PAGE_SECONDS = 30  # seconds of the page's schedule whose documents are counted
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


def scenario_dashboard_instructions(env: Env) -> dict[str, Any]:
    """Instructions per create with no page, with the page open, and the page's documents."""
    from bench import instructions

    why_not = instructions.available()
    if why_not:
        return {"skipped": why_not}
    if not env.skyproxy:
        raise BenchError("skyproxy is not available")
    requests = env.args.instructions_requests
    env.check_time("dashboard-instructions", 420 + env.args.warmup + 3 * env.args.duration)
    _, up_port, up_kind = start_upstream_fast(env, "upstream-fast")
    rates = _saturated_rates(env, up_port)
    # The fastest run: other work on the machine only ever slows a run down, so it is the
    # closest to the rate of a quiet machine, and still no more than it (the documents'
    # share, their cost over the requests of a second, is then never understated).
    rate = max(rates)
    out_file = env.workdir / "callgrind-dashboard.out"
    wrap = instructions.wrap(out_file)
    proc, port, audit_dir = start_skyproxy(
        env, "skyproxy-dashboard-ins", up_port, wrap=wrap, deadline_s=120.0
    )
    url = f"http://127.0.0.1:{port}"
    counter = _Lines(audit_dir / "audit.jsonl")
    try:
        _fetch(url, "summary")  # the history built before anything is counted
        _creates(env, url, max(requests // 5, 100))
        counter.wait_for(max(requests // 5, 100))
        _fetch(url, "predictions")  # warm, and caught up: nothing left to read
        fetched = _count_phases(env, proc.pid, url, requests, counter)
    finally:
        env.procs.stop(proc)
    try:
        counts = [instructions.dumped_total(out_file, i) / requests for i in range(len(PHASES))]
    except RuntimeError as exc:
        raise BenchError(str(exc)) from exc
    documents = counts.pop() * requests / PAGE_SECONDS  # the last dump: per page-second
    closed, opened = counts[0::2], counts[1::2]
    # Each open phase against the mean of the closed ones either side: a slow drift of
    # the count over the run (the heap, the caches) cancels out.
    pairs = sorted(o / ((a + b) / 2) for o, a, b in zip(opened, closed, closed[1:], strict=False))
    base = sum(closed) / len(closed)
    lines = pairs[len(pairs) // 2]
    return {
        "upstream": up_kind,
        "requests": requests,
        "rate_rps": rate,
        "rates_rps": rates,
        "documents": fetched,
        "per_create": {"closed": [round(c) for c in closed], "open": [round(o) for o in opened]},
        "documents_per_page_second": round(documents),
        "lines_ratio": round(lines, 4),
        "lines_ratio_range": [round(pairs[0], 4), round(pairs[-1], 4)],
        "closed_range": round(max(closed) / min(closed), 4),
        "documents_share": round(documents / rate / base, 4),
        "cost": round(lines + documents / rate / base, 4),
        "cost_at_1000_rps": round(lines + documents / 1000 / base, 4),
    }


# The counted phases, each ended by a dump: N creates with no page or with the page open
# (its lines read at the end, as the page's next poll would), then the page's documents.
PHASES = ("closed", "open", "closed", "open", "closed", "open", "closed", "documents")


def _count_phases(env: Env, pid: int, url: str, requests: int, counter: _Lines) -> int:
    from bench import instructions

    fetched = 0
    instructions.control(pid, "-i", "on")
    for phase in PHASES:
        if phase == "documents":
            for second in range(PAGE_SECONDS):
                for path, every in SCHEDULE:
                    if second % every == 0:
                        _fetch(url, path)
                        fetched += 1
        else:
            _creates(env, url, requests)
            counter.wait_for(requests)  # the writer's work on them counted in the phase too
            if phase == "open":
                _fetch(url, "summary")  # reads every line just written
        instructions.control(pid, "-d")
        if phase == "closed":
            # An open page would have read these lines as they came: no cost of the next phase.
            instructions.control(pid, "-i", "off")
            _fetch(url, "predictions")
            instructions.control(pid, "-i", "on")
    instructions.control(pid, "-i", "off")
    return fetched


def _saturated_rates(env: Env, up_port: int) -> list[float]:
    """The proxy's req/s in three wrk runs at 64 connections, not under callgrind."""
    proc, port, _ = start_skyproxy(env, "skyproxy-dashboard-rate", up_port)
    try:
        url = f"http://127.0.0.1:{port}"
        run_wrk(env, url, 64, env.args.warmup)
        rates = [round(float(run_wrk(env, url, 64, env.args.duration)["rps"]), 1) for _ in range(3)]
    finally:
        env.procs.stop(proc)
    if max(rates) <= 0:
        raise BenchError("wrk measured no throughput")
    return rates


class _Lines:
    """Counts the audit file's lines, to wait until the writer has written a phase's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen = self._count()

    def wait_for(self, more: int) -> None:
        deadline = time.monotonic() + 300
        while (found := self._count()) < self.seen + more:
            if time.monotonic() > deadline:
                raise BenchError(f"the audit file has {found - self.seen} of {more} lines")
            time.sleep(0.05)
        if found != self.seen + more:
            raise BenchError(f"the audit file has {found - self.seen} lines, not {more}")
        self.seen = found

    def _count(self) -> int:
        try:
            return self.path.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0


def _fetch(url: str, path: str, timeout: float = 120) -> None:
    with urllib.request.urlopen(f"{url}/-/api/{path}", timeout=timeout) as answer:
        answer.read()


def _creates(env: Env, url: str, requests: int) -> None:
    cmd = [*env.cpus.prefix(env.cpus.load), PYTHON, "-m", "bench.instructions", "load", "--url", url]
    cmd += ["--kind", "create", "--requests", str(requests), "--concurrency", "16"]
    done = subprocess.run(cmd, cwd=ROOT, env=env.child_env, capture_output=True, timeout=600)
    if done.returncode != 0:
        raise BenchError(f"creates failed: {(done.stdout + done.stderr).decode()[-300:]}")


def lines_micro(count: int = 20_000, runs: int = 5) -> dict[str, float]:
    """CPU µs per audit line (the best of `runs`): parsing alone, reading, the board's whole
    step (read and counted), and the tail's (the file read and split into lines), on created
    lines with a cost as the writer writes them."""
    import orjson

    from skyproxy.audit.record import AuditRecord
    from skyproxy.dashboard import lines
    from skyproxy.dashboard.board import Board
    from skyproxy.dashboard.tail import AuditTail
    from skyproxy.ops.metrics import Metrics

    now = time.time()
    raws = [
        AuditRecord(
            timestamp=now + i / 1000,
            environment="default",
            userId=f"bench-user-{i % 100}",
            predictionId=str(uuid.uuid4()),
            model="truefusion-pro",
            status="created",
            httpStatus=201,
            latencyMs=1.234,
            costUsd=0.0123,
            ipAddress="127.0.0.1",
            requestId=uuid.uuid4().hex,
            keyFingerprint="sha256:1a2b3c4d5e6f7a8b",
            method="POST",
            path="/v1/predictions",
        )
        .to_bytes()
        .rstrip(b"\n")
        for i in range(count)
    ]

    def tail() -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "audit.jsonl"
            path.write_bytes(b"\n".join(raws) + b"\n")
            reader = AuditTail(path)
            t0 = time.process_time()
            while reader.read():
                pass
            spent.append(time.process_time() - t0)
            reader.close()

    spent: list[float] = []
    for _ in range(runs):
        tail()

    def take() -> None:
        board = Board(Path("/nonexistent/audit.jsonl"), Metrics(), now)
        board.built = True
        board.take_lines(raws)

    def best(step: Any) -> float:
        times = []
        for _ in range(runs):
            t0 = time.process_time()
            step()
            times.append(time.process_time() - t0)
        return round(min(times) * 1e6 / count, 2)

    return {
        "bytes": len(raws[0]),
        "orjson_loads_us": best(lambda: [orjson.loads(raw) for raw in raws]),
        "read_us": best(lambda: [lines.read(raw) for raw in raws]),
        "board_us": best(take),
        "tail_us": round(min(spent) * 1e6 / count, 2),
    }


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    return [_throughput_verdict(results), _cost_verdict(results)]


def _throughput_verdict(results: dict[str, Any]) -> Verdict:
    section = results.get("dashboard")
    target = f">= {TARGET_DASHBOARD_RATIO:.2f}x closed"
    name = "dashboard open: throughput (64 conns)"
    if not isinstance(section, dict) or "summary" not in section:
        why = "scenario not run" if section is None else str(section.get("error", "-"))[:120]
        return Verdict(name, "SKIP", "-", target, why)
    s = section["summary"]
    errors = sum(x[k]["error_total"] for x in section["rounds"] for k in ("open", "closed"))
    note = (
        f"per round {s['ratio_per_round']['min']:.3f}-{s['ratio_per_round']['max']:.3f}; "
        f"proxy CPU {s['open_cpu_us']['median']:.1f} vs {s['closed_cpu_us']['median']:.1f} µs/request"
        + (f"; {errors} wrk errors" if errors else "")
    )
    ok = s["ratio"] >= TARGET_DASHBOARD_RATIO and not errors
    return Verdict(name, "PASS" if ok else "FAIL", f"{s['ratio']:.3f}x", target, note)


def _cost_verdict(results: dict[str, Any]) -> Verdict:
    section = results.get("dashboard-instructions")
    target = f"<= {TARGET_DASHBOARD_COST:.2f}x no page"
    name = "dashboard open: instructions per create"
    if not isinstance(section, dict) or "cost" not in section:
        why = "scenario not run" if section is None else str(section.get("error", section.get("skipped")))
        return Verdict(name, "SKIP", "-", target, why[:120])
    low, high = section["lines_ratio_range"]
    note = (
        f"lines {section['lines_ratio']:.3f}x (pairs {low:.3f}-{high:.3f}) + documents "
        f"{section['documents_share']:.3f} at {section['rate_rps']:,.0f} req/s "
        f"({section['cost_at_1000_rps']:.3f}x at 1,000 req/s)"
    )
    ok = section["cost"] <= TARGET_DASHBOARD_COST
    return Verdict(name, "PASS" if ok else "FAIL", f"{section['cost']:.3f}x", target, note)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("poll", help="fetch /-/api/ on the page's schedule")
    p.add_argument("--url", required=True)
    p.add_argument("--seconds", type=float, required=True)
    sub.add_parser("lines", help="CPU µs to read one audit line")
    args = parser.parse_args(argv)
    result = poll(args.url, args.seconds) if args.command == "poll" else lines_micro()
    sys.stdout.write("BENCH_RESULT " + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
