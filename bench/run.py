"""The skyproxy benchmark suite: one command, bounded in time, cleans up after itself.

    .venv/bin/python -m bench            # full run (about 8-10 minutes)
    .venv/bin/python -m bench --quick    # smoke run (about 2-3 minutes)

See bench/README.md for what each scenario measures and how to read the verdicts.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
POST_LUA = BENCH_DIR / "post.lua"
PYTHON = sys.executable
KEY_ENV = "SKYPROXY_BENCH_KEY"
BENCH_KEY = "sk-bench-dummy-key-0000000000000000"
SECRET_ENV = "SKYPROXY_BENCH_WHSEC"  # the relay's whsec_ secret, made anew for each run
SCENARIOS = (
    "throughput",
    "idle",
    "streams",
    "limiter",
    "audit",
    "webhooks",
    "coldstart",
    "instructions",
    "redis",
    "dashboard",
    "dashboard-instructions",
    "opcodes",
)
# Run only when asked for (`--scenarios opcodes`): a diagnosis of where bytecodes go.
OPT_IN_SCENARIOS = frozenset({"opcodes"})
PREDICTION_BODY = b'{"model":"truefusion-pro","input":{"prompt":"test"}}'

# The targets of the issue; every verdict line prints its threshold.
TARGET_THROUGHPUT_RATIO = 0.85
TARGET_P50_RATIO = 1.3
TARGET_IDLE_RSS_MB = 60.0
TARGET_STREAMS = 10_000
TARGET_STREAMS_RSS_MB = 400.0
TARGET_LIMITER_GROWTH_PCT = 10.0
TARGET_LIMITER_STALL_P999_MS = 20.0
TARGET_AUDIT_LINES_PER_S = 50_000.0
TARGET_AUDIT_STALL_P99_MS = 5.0
TARGET_COLD_START_MS = 300.0
TARGET_WEBHOOKS_COST = 1.05  # instructions per create and per get, [webhooks] on / off
# The search for the key in success bodies, against the same proxy without it, same run.
TARGET_SCAN_THROUGHPUT_RATIO = 0.97
TARGET_SCAN_INSTRUCTIONS_RATIO = 1.03
# Client tokens plus a budget, against the same proxy with neither, same run (issue 12).
TARGET_ACCESS_THROUGHPUT_RATIO = 0.95
TARGET_ACCESS_INSTRUCTIONS_RATIO = 1.05

SKYPROXY_CONFIG = """\
[server]
max_body_bytes = 52428800
upstream_timeout = {upstream_timeout}
watch_config = false
{scan}

[environments.bench]
listen = ["127.0.0.1:{port}"]
upstream = "http://127.0.0.1:{upstream_port}"
key = "env:{key_env}"
rate_limit = {{ per_user = "100000000/second" }}
{client_auth}
[rate_limit]
enabled = {features}
user_header = "X-User-Id"

[[rate_limit.rules]]
name = "predictions"
methods = ["POST"]
paths = ["/v1/predictions", "/v1/predict"]
per_user = "100000000/second"
per_environment = "100000000/second"

[audit]
enabled = {features}
path = "{audit_dir}/audit.jsonl"
max_bytes = 104857600
{access}"""

# The tokens + budgets target: every request presents a client token, and every create
# reserves a priced estimate under a budget it never reaches.
PRICING_CONFIG = """
[pricing]
truefusion-pro = 0.000001
"""
ACCESS_CONFIG = (
    """
[tokens]
file = "{tokens_file}"
"""
    + PRICING_CONFIG
    + """
[[budgets]]
name = "bench"
per = "user"
usd = 1000000000
period = "month"
"""
)
TOKEN_ENV = "SKYPROXY_BENCH_TOKEN"  # the client token the load generators present
# skyproxy against each same-run variant of itself, as the throughput report names them.
COST_RATIOS = {
    "skyproxy-vs-off": "limits+audit on / off",
    "skyproxy-vs-noscan": "key scan of success bodies on / off",
    "skyproxy-vs-twin": "A/A control: skyproxy / skyproxy-twin, the same config in two processes",
}

# The receiver's store sits beside the config, in the run's temp dir: on disk, not tmpfs,
# where the bench checks (`store_filesystem` in the results).
WEBHOOKS_CONFIG = """
[webhooks]
listen = ["127.0.0.1:{port}"]
store = "state/webhooks.sqlite3"
signing_secret = "env:{secret_env}"
"""


def webhooks_table(port: int) -> str:
    return WEBHOOKS_CONFIG.format(port=port, secret_env=SECRET_ENV)


class BenchError(RuntimeError):
    """A step of the benchmark could not run (not a failed target)."""


# --- small helpers ---------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and min-max of a list of per-round values."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def read_status_kb(pid: int, field_name: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), 0 when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


def descendants(pid: int) -> list[int]:
    """pid and all its descendants (skyproxy could fork workers; count them all)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def tree_kb(pid: int, field_name: str = "VmRSS") -> int:
    return sum(read_status_kb(p, field_name) for p in descendants(pid))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process tree, in seconds (live processes only)."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process tree, in seconds: callgrind counts only the first."""
    user, system, _ = _stat(pid)
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def minor_faults(pid: int) -> int:
    """Page faults a process tree took without reading a disk: memory it touched anew."""
    return _stat(pid)[2]


def _stat(pid: int) -> tuple[int, int, int]:
    user = system = faults = 0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        faults += int(fields[7])
        user += int(fields[11])
        system += int(fields[12])
    return user, system, faults


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def nofile_limits() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return int(soft), int(hard)


def raise_nofile() -> None:
    """preexec_fn for every child: soft RLIMIT_NOFILE up to the hard limit (ulimit -n)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else ""


def module_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return ""


# --- processes -------------------------------------------------------------------------


@dataclass
class Cpus:
    """Where things run: the proxy under test alone on one core, everything else on another."""

    proxy: int | None
    load: int | None
    # A negative niceness (root only) for everything the bench starts, so that unrelated
    # processes on a shared machine take less of the measured cores. Same for every target.
    nice: int = 0

    @property
    def pinned(self) -> bool:
        return self.proxy is not None

    def prefix(self, cpu: int | None) -> list[str]:
        nice = ["nice", "-n", str(self.nice)] if self.nice else []
        return nice + (["taskset", "-c", str(cpu)] if cpu is not None else [])

    @classmethod
    def detect(cls, enabled: bool, nice: int) -> Cpus:
        if nice < 0 and os.geteuid() != 0:
            nice = 0
        allowed = sorted(os.sched_getaffinity(0))
        if not enabled or len(allowed) < 2 or not shutil.which("taskset"):
            return cls(None, None, nice)
        return cls(allowed[0], allowed[1], nice)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Procs:
    """Every process the bench starts, each in its own process group; stop_all kills them."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], cpu: int | None, cpus: Cpus, env: dict[str, str]) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log_file:
            popen = subprocess.Popen(
                cpus.prefix(cpu) + cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,
                preexec_fn=raise_nofile,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(grace)
        # Kill whatever is left in the group (nginx workers, stream client workers).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc, grace=3.0)


def wait_http(url: str, proc: Proc, deadline_s: float = 20.0, ok: Sequence[int] = (200,)) -> float:
    """Poll url until it answers one of ``ok``; returns seconds waited. Raises on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        with contextlib.suppress(OSError):
            status, _ = http("GET", url)
            if status in ok:
                return time.monotonic() - start
        time.sleep(0.05)
    raise BenchError(f"{proc.name} not ready at {url} after {deadline_s:.0f}s:\n{proc.log_tail()}")


# --- the things under test -------------------------------------------------------------


@dataclass
class Env:
    """Everything one run shares: options, cpus, processes, the temp dir, the deadline."""

    args: argparse.Namespace
    cpus: Cpus
    procs: Procs
    workdir: Path
    deadline: float
    skyproxy: str | None
    child_env: dict[str, str]

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check_time(self, what: str, needed: float) -> None:
        if self.remaining() < needed:
            raise BenchError(f"not enough time left for {what} ({self.remaining():.0f}s)")


def find_skyproxy(explicit: str | None) -> str | None:
    """The skyproxy console script, when ``skyproxy --help`` works."""
    candidates = [explicit] if explicit else [str(Path(PYTHON).parent / "skyproxy"), "skyproxy"]
    for candidate in candidates:
        path = shutil.which(candidate) if candidate else None
        if not path:
            continue
        try:
            out = subprocess.run([path, "--help"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0:
            return path
    return None


def start_upstream_fast(env: Env, name: str) -> tuple[Proc, int, str]:
    """nginx with canned answers when installed, else the aiohttp fast upstream."""
    port = free_port()
    if shutil.which("nginx") and not env.args.no_nginx:
        from bench.upstreams import nginx_command, nginx_upstream_conf

        conf = nginx_upstream_conf(env.workdir / name, port)
        proc = env.procs.start(name, nginx_command(conf), env.cpus.load, env.cpus, env.child_env)
        kind = "nginx"
    else:
        cmd = [PYTHON, "-m", "bench.upstreams", "fast", "--port", str(port)]
        proc = env.procs.start(name, cmd, env.cpus.load, env.cpus, env.child_env)
        kind = "aiohttp"
    wait_http(f"http://127.0.0.1:{port}/-/health", proc)
    return proc, port, kind


def start_bare(
    env: Env, name: str, upstream_port: int, wrap: Sequence[str] = (), deadline_s: float = 20.0
) -> tuple[Proc, int]:
    port = free_port()
    cmd = [
        *wrap,
        PYTHON,
        "-m",
        "bench.bare_proxy",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"http://127.0.0.1:{upstream_port}",
        "--key-env",
        KEY_ENV,
    ]
    proc = env.procs.start(name, cmd, env.cpus.proxy, env.cpus, env.child_env)
    wait_http(f"http://127.0.0.1:{port}/-/health", proc, deadline_s=deadline_s)
    return proc, port


def write_skyproxy_config(
    env: Env,
    name: str,
    port: int,
    upstream_port: int,
    upstream_timeout: float = 120,
    features: bool = True,
    access: bool = False,
    extra: str = "",
    scan: bool = True,
) -> Path:
    cfg_dir = env.workdir / name
    audit_dir = cfg_dir / "audit"
    # Empty at each start: the dashboard reads the audit files it finds into its history
    # in a thread, which an earlier scenario's lines would put inside a later count.
    shutil.rmtree(audit_dir, ignore_errors=True)
    audit_dir.mkdir(parents=True, exist_ok=True)
    path = cfg_dir / "skyproxy.toml"
    tokens_file = cfg_dir / "tokens.json"
    if access:
        from skyproxy.tokens import store

        # A fresh file: an earlier scenario of the same run may have made this target's.
        tokens_file.unlink(missing_ok=True)
        token = store.create(tokens_file, "bench", ["bench"], trust_user_header=True)
        env.child_env[TOKEN_ENV] = token.reveal()
    path.write_text(
        SKYPROXY_CONFIG.format(
            port=port,
            upstream_port=upstream_port,
            key_env=KEY_ENV,
            audit_dir=audit_dir,
            upstream_timeout=f"{upstream_timeout:g}",
            features="true" if features else "false",
            client_auth='client_auth = "required"' if access else "",
            access=ACCESS_CONFIG.format(tokens_file=tokens_file) if access else "",
            # Only when off: a reference tree from before the switch knows no such key.
            scan="" if scan else "scan_success_bodies = false",
        )
        + extra
    )
    return path


def start_skyproxy(
    env: Env,
    name: str,
    upstream_port: int,
    upstream_timeout: float = 120,
    features: bool = True,
    wrap: Sequence[str] = (),
    deadline_s: float = 30.0,
    access: bool = False,
    extra: str = "",
    scan: bool = True,
    source: Path | None = None,
) -> tuple[Proc, int, Path]:
    """skyproxy with guard, limits, audit and metrics on; `features=False` turns limits
    and audit off, for the same-run cost of those two features; `access=True` adds
    client tokens and a budget; `scan=False` stops the search for the key in success
    bodies (`scan_success_bodies`, benchmark only). `wrap` prefixes the command
    (callgrind), which then runs the console script through the interpreter. `extra` is
    appended to the config (the redis scenario's `[cluster]`, the webhooks scenario's
    `[webhooks]`). `source` is another skyproxy source tree to run instead of the
    installed one (`--reference`)."""
    if not env.skyproxy:
        raise BenchError("skyproxy is not available")
    port = free_port()
    config = write_skyproxy_config(
        env, name, port, upstream_port, upstream_timeout, features, access, extra, scan
    )
    cmd = [env.skyproxy, "serve", "-c", str(config)]
    child_env = env.child_env
    if source is not None:
        # First on the path, ahead of the installed package and of the bench's own tree;
        # run as a module, since the console script names the installed tree's entry point.
        # -P: the working directory (this tree) is not put ahead of PYTHONPATH.
        child_env = {**child_env, "PYTHONPATH": str(source) + os.pathsep + child_env["PYTHONPATH"]}
        cmd = ["-P", "-m", "skyproxy", "serve", "-c", str(config)]
        cmd = [*wrap, PYTHON, *cmd] if wrap else [PYTHON, *cmd]
    elif wrap:
        cmd = [*wrap, PYTHON, *cmd]
    proc = env.procs.start(name, cmd, env.cpus.proxy, env.cpus, child_env)
    wait_http(f"http://127.0.0.1:{port}/-/health", proc, deadline_s=deadline_s)
    return proc, port, config.parent / "audit"


# The throughput scenario's skyproxy targets: start_skyproxy's options for each.
SKYPROXY_TARGETS: dict[str, dict[str, Any]] = {
    "skyproxy": {},
    "skyproxy-off": {"features": False},
    "skyproxy-noscan": {"scan": False},
    "skyproxy-access": {"access": True},
    # An A/A control: skyproxy's own config in another process. What it measures against
    # skyproxy is this machine's noise floor for the same-run cost ratios.
    "skyproxy-twin": {},
}


def _start_target(
    env: Env, name: str, upstream_port: int, tokens: dict[str, str], options: dict[str, Any]
) -> tuple[Proc, int]:
    proc, port, _ = start_skyproxy(env, name, upstream_port, **options)
    token = env.child_env.pop(TOKEN_ENV, None)
    if token is not None:
        tokens[name] = token  # a new token file each start
    return proc, port


def _fresh(
    env: Env,
    starter: Callable[[], tuple[Proc, int]],
    tokens: dict[str, str],
    name: str,
    warmup_requests: dict[str, int],
) -> tuple[Proc, int]:
    """A target in a new process, warmed up. Each process draws its own address-space layout
    and string hash seed, and identical configs in separate processes differed by 5-8% in CPU
    per request over the same interleaved rounds; a process per round averages whatever of
    that is the process's with the rest of the round-to-round noise (as pyperf's workers do)."""
    started = starter()
    warm = run_wrk(env, f"http://127.0.0.1:{started[1]}", 64, env.args.warmup, tokens.get(name))
    warmup_requests[name] += warm["requests"]
    return started


def start_nginx_proxy(env: Env, name: str, upstream_port: int) -> tuple[Proc, int]:
    from bench.upstreams import nginx_command, nginx_proxy_conf

    port = free_port()
    conf = nginx_proxy_conf(env.workdir / name, port, upstream_port, BENCH_KEY)
    proc = env.procs.start(name, nginx_command(conf), env.cpus.proxy, env.cpus, env.child_env)
    wait_http(f"http://127.0.0.1:{port}/-/health", proc)
    return proc, port


def check_prediction(url: str, token: str | None = None) -> dict[str, Any]:
    """One POST through a target: it must answer 201 with a prediction object."""
    headers = {"Content-Type": "application/json", "X-User-Id": "bench-check"}
    if token:
        headers["x-api-key"] = token
    status, body = http("POST", url + "/v1/predictions", PREDICTION_BODY, headers)
    try:
        data = json.loads(body)
    except ValueError:
        data = {}
    if status != 201 or not isinstance(data, dict) or "id" not in data:
        raise BenchError(f"POST {url}/v1/predictions answered {status}: {body[:300]!r}")
    return {"status": status, "id": data["id"]}


# --- wrk -------------------------------------------------------------------------------


def run_wrk(
    env: Env, url: str, connections: int, duration: float, token: str | None = None
) -> dict[str, Any]:
    """One wrk run with post.lua; returns req/s, latency percentiles (µs) and errors.
    With `token`, every request presents it as its client token."""
    threads = 1 if connections < 64 else max(1, min(2, env.args.wrk_threads))
    cmd = [
        *env.cpus.prefix(env.cpus.load),
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{duration:g}s",
        "--timeout",
        "10s",
        "-s",
        str(POST_LUA),
        url + "/",
    ]
    child_env = {**env.child_env, "BENCH_TOKEN": token} if token else env.child_env
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, env=child_env)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stdout[-500:]}{out.stderr[-500:]}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    seconds = data["duration_us"] / 1e6
    errors = data["errors"]
    return {
        "connections": connections,
        "requests": data["requests"],
        "rps": data["requests"] / seconds if seconds else 0.0,
        "latency_us": data["latency_us"],
        "errors": errors,
        "error_total": sum(errors.values()),
    }


# --- scenarios -------------------------------------------------------------------------


def scenario_throughput(env: Env) -> dict[str, Any]:
    """Throughput at 64 connections and latency at 1, every target interleaved per round."""
    args = env.args
    # A new process per round: a start (about a second) and a warm-up, for each but nginx.
    per_target = 2 * args.duration + 3 + (0 if args.same_processes else args.warmup + 1.5)
    n_targets = 2 + (5 if env.skyproxy else 0) + (0 if args.no_nginx_proxy else 1)
    env.check_time("throughput", n_targets * (args.rounds * per_target + args.warmup))

    up_proc, up_port, up_kind = start_upstream_fast(env, "upstream-fast")
    targets: dict[str, tuple[Proc, int]] = {}
    tokens: dict[str, str] = {}  # the client token each target's load presents, if any
    notes: list[str] = []
    # How each Python target starts: again for every round unless --same-processes.
    starters: dict[str, Callable[[], tuple[Proc, int]]] = {"bare": lambda: start_bare(env, "bare", up_port)}
    sky_audit: Path | None = None
    retired_lines = 0  # audit lines of skyproxy processes that earlier rounds ran
    if env.skyproxy:
        sky_audit = env.workdir / "skyproxy" / "audit"  # as write_skyproxy_config lays it out
        for name, options in SKYPROXY_TARGETS.items():
            starters[name] = functools.partial(_start_target, env, name, up_port, tokens, options)
    else:
        notes.append("skyproxy not available: only the references ran")
    for name, starter in starters.items():
        targets[name] = starter()
    if not args.no_nginx_proxy and shutil.which("nginx"):
        targets["nginx-proxy"] = start_nginx_proxy(env, "nginx-proxy", up_port)

    checks = {
        name: check_prediction(f"http://127.0.0.1:{port}", tokens.get(name))
        for name, (_, port) in targets.items()
    }
    rss_before = {name: tree_kb(p.pid) for name, (p, _) in targets.items()}
    warmup_requests: dict[str, int] = {}
    for name, (_, port) in targets.items():
        log(f"warm-up {name} ({args.warmup:g}s)")
        warmup = run_wrk(env, f"http://127.0.0.1:{port}", 64, args.warmup, tokens.get(name))
        warmup_requests[name] = warmup["requests"]

    names = list(targets)
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        this_round: dict[str, Any] = {"order": order}
        for name in order:
            if r > 0 and name in starters and not args.same_processes:
                env.procs.stop(targets[name][0])  # SIGTERM: skyproxy flushes its audit queue
                if name == "skyproxy" and sky_audit is not None:
                    retired_lines += count_lines(sky_audit)  # a start empties the folder
                targets[name] = _fresh(env, starters[name], tokens, name, warmup_requests)
            url = f"http://127.0.0.1:{targets[name][1]}"
            pid = targets[name][0].pid
            (user0, sys0), faults0 = cpu_split(pid), minor_faults(pid)
            high = run_wrk(env, url, 64, args.duration, tokens.get(name))
            (user1, sys1), faults1 = cpu_split(pid), minor_faults(pid)
            cpu0, cpu1 = user0 + sys0, user1 + sys1
            low = run_wrk(env, url, 1, args.duration, tokens.get(name))
            # CPU the proxy spent per request at 64 conns: less sensitive to noisy neighbours
            # than req/s (it does not count time the proxy waited for its core).
            high["proxy_cpu_seconds"] = round(cpu1 - cpu0, 3)
            high["proxy_cpu_us_per_request"] = (
                (cpu1 - cpu0) * 1e6 / high["requests"] if high["requests"] else 0
            )
            high["proxy_sys_us_per_request"] = (
                (sys1 - sys0) * 1e6 / high["requests"] if high["requests"] else 0
            )
            high["proxy_faults_per_request"] = (
                (faults1 - faults0) / high["requests"] if high["requests"] else 0
            )
            this_round[name] = {"c64": high, "c1": low}
            log(
                f"round {r + 1}/{args.rounds} {name:<15} {high['rps']:9.0f} req/s @64  "
                f"p50 {low['latency_us']['p50']:6d} µs  p99 {low['latency_us']['p99']:6d} µs @1"
                + (
                    f"  errors {high['error_total'] + low['error_total']}"
                    if high["error_total"] + low["error_total"]
                    else ""
                )
            )
        rounds.append(this_round)

    summary: dict[str, Any] = {}
    for name in names:
        rs = [rd[name] for rd in rounds]
        summary[name] = {
            "rps_c64": spread([x["c64"]["rps"] for x in rs]),
            "cpu_us_per_request_c64": spread([x["c64"]["proxy_cpu_us_per_request"] for x in rs]),
            "sys_us_per_request_c64": spread([x["c64"]["proxy_sys_us_per_request"] for x in rs]),
            "faults_per_request_c64": spread([x["c64"]["proxy_faults_per_request"] for x in rs]),
            "p50_us_c1": spread([x["c1"]["latency_us"]["p50"] for x in rs]),
            "p99_us_c1": spread([x["c1"]["latency_us"]["p99"] for x in rs]),
            "p50_us_c64": spread([x["c64"]["latency_us"]["p50"] for x in rs]),
            "p99_us_c64": spread([x["c64"]["latency_us"]["p99"] for x in rs]),
            "errors": sum(x["c64"]["error_total"] + x["c1"]["error_total"] for x in rs),
            "requests": sum(x["c64"]["requests"] + x["c1"]["requests"] for x in rs),
            "rss_kb_before": rss_before[name],
            "rss_kb_after": tree_kb(targets[name][0].pid),
        }

    ratios: dict[str, Any] = {}
    for name in names:
        if name == "bare":
            continue
        paired_rps = [rd[name]["c64"]["rps"] / rd["bare"]["c64"]["rps"] for rd in rounds]
        paired_p50 = [
            rd[name]["c1"]["latency_us"]["p50"] / rd["bare"]["c1"]["latency_us"]["p50"] for rd in rounds
        ]
        paired_p99 = [
            rd[name]["c1"]["latency_us"]["p99"] / rd["bare"]["c1"]["latency_us"]["p99"] for rd in rounds
        ]
        ratios[name] = {
            "throughput": ratio(summary[name]["rps_c64"]["median"], summary["bare"]["rps_c64"]["median"]),
            "p50_c1": ratio(summary[name]["p50_us_c1"]["median"], summary["bare"]["p50_us_c1"]["median"]),
            "p99_c1": ratio(summary[name]["p99_us_c1"]["median"], summary["bare"]["p99_us_c1"]["median"]),
            "throughput_per_round": spread(paired_rps),
            "cpu_per_request": ratio(
                summary[name]["cpu_us_per_request_c64"]["median"],
                summary["bare"]["cpu_us_per_request_c64"]["median"],
            ),
            "p50_c1_per_round": spread(paired_p50),
            "p99_c1_per_round": spread(paired_p99),
        }

    # What limits and audit cost, and what the key search in success bodies costs,
    # each against the same proxy without it, same run.
    for other in ("skyproxy-off", "skyproxy-noscan", "skyproxy-twin"):
        if "skyproxy" in targets and other in targets:
            ratios["skyproxy-vs-" + other.removeprefix("skyproxy-")] = {
                "throughput": ratio(
                    summary["skyproxy"]["rps_c64"]["median"], summary[other]["rps_c64"]["median"]
                ),
                "throughput_per_round": spread(
                    [rd["skyproxy"]["c64"]["rps"] / rd[other]["c64"]["rps"] for rd in rounds]
                ),
                "cpu_per_request": ratio(
                    summary["skyproxy"]["cpu_us_per_request_c64"]["median"],
                    summary[other]["cpu_us_per_request_c64"]["median"],
                ),
            }

    if "skyproxy" in targets and "skyproxy-access" in targets:
        # What client tokens plus a budget cost, against the same proxy with neither, same run.
        ratios["access-vs-skyproxy"] = {
            "throughput": ratio(
                summary["skyproxy-access"]["rps_c64"]["median"], summary["skyproxy"]["rps_c64"]["median"]
            ),
            "throughput_per_round": spread(
                [rd["skyproxy-access"]["c64"]["rps"] / rd["skyproxy"]["c64"]["rps"] for rd in rounds]
            ),
            "cpu_per_request": ratio(
                summary["skyproxy-access"]["cpu_us_per_request_c64"]["median"],
                summary["skyproxy"]["cpu_us_per_request_c64"]["median"],
            ),
            # The kernel's share: what callgrind's instruction count cannot see.
            "sys_us_per_request": [
                round(summary[t]["sys_us_per_request_c64"]["median"], 1)
                for t in ("skyproxy", "skyproxy-access")
            ],
            "faults_per_request": [
                round(summary[t]["faults_per_request_c64"]["median"], 2)
                for t in ("skyproxy", "skyproxy-access")
            ],
        }

    extra: dict[str, Any] = {}
    if "skyproxy" in targets:
        extra["metrics"] = scrape_metrics(f"http://127.0.0.1:{targets['skyproxy'][1]}")
    for proc, _ in targets.values():
        env.procs.stop(proc)  # SIGTERM: skyproxy flushes its audit queue
    env.procs.stop(up_proc)
    if "skyproxy" in targets and sky_audit is not None:
        extra["audit_lines"] = retired_lines + count_lines(sky_audit)
        extra["audit_files"] = sorted(p.name for p in sky_audit.iterdir())
        # Every request that reached skyproxy: the check, the warm-up and the rounds.
        extra["skyproxy_requests_sent"] = 1 + warmup_requests["skyproxy"] + summary["skyproxy"]["requests"]
    return {
        "upstream": up_kind,
        "targets": names,
        "checks": checks,
        "rounds": rounds,
        "summary": summary,
        "ratios": ratios,
        "notes": notes,
        **extra,
    }


def count_lines(folder: Path) -> int:
    total = 0
    for path in folder.glob("audit.jsonl*"):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                total += chunk.count(b"\n")
    return total


def scrape_metrics(base: str) -> dict[str, Any]:
    try:
        status, body = http("GET", base + "/-/metrics")
    except OSError as exc:
        return {"error": repr(exc)}
    names = sorted(
        {
            re.split(r"[{ ]", ln, maxsplit=1)[0]
            for ln in body.decode(errors="replace").splitlines()
            if ln and not ln.startswith("#")
        }
    )
    return {"status": status, "bytes": len(body), "series_names": names[:60]}


def scenario_idle(env: Env) -> dict[str, Any]:
    """RSS of a fresh skyproxy (and of the bare reference) once started and idle."""
    env.check_time("idle", 30)
    up_proc, up_port, _ = start_upstream_fast(env, "upstream-idle")
    result: dict[str, Any] = {}
    try:
        started: dict[str, tuple[Proc, int]] = {"bare": start_bare(env, "bare-idle", up_port)}
        if env.skyproxy:
            proc, port, _ = start_skyproxy(env, "skyproxy-idle", up_port)
            started["skyproxy"] = (proc, port)
        time.sleep(env.args.idle_settle)
        for name, (proc, port) in started.items():
            pids = descendants(proc.pid)
            result[name] = {
                "rss_kb": tree_kb(proc.pid),
                "processes": len(pids),
                "threads": sum(_threads(p) for p in pids),
                "open_fds": open_fds(proc.pid),
            }
            check_prediction(f"http://127.0.0.1:{port}")
            time.sleep(0.5)
            result[name]["rss_kb_after_one_request"] = tree_kb(proc.pid)
            env.procs.stop(proc)
    finally:
        env.procs.stop(up_proc)
    return result


def _threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


class RssSampler(threading.Thread):
    """Samples a process tree's RSS every ``interval`` seconds and keeps the peak; with
    ``stats_url`` (the trickle upstream's /-/stats) each sample also records how many
    streams were open, as (seconds, rss_kb, open_streams)."""

    def __init__(self, pid: int, interval: float = 0.25, stats_url: str | None = None) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.stats_url = stats_url
        self.peak_kb = 0
        self.samples: list[tuple[float, int, int]] = []
        self._stop_event = threading.Event()
        self._start = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.is_set():
            kb = tree_kb(self.pid)
            active = -1
            if self.stats_url:
                with contextlib.suppress(OSError, ValueError):
                    active = int(json.loads(http("GET", self.stats_url)[1])["active"])
            self.peak_kb = max(self.peak_kb, kb)
            self.samples.append((round(time.monotonic() - self._start, 2), kb, active))
            self._stop_event.wait(self.interval)

    def growth_while_all_open(self, count: int) -> float | None:
        """RSS slope in kB/s over the second half of the time all ``count`` streams were
        open: ~0 for a proxy that keeps nothing per event, positive when something grows
        with the age of a stream."""
        held = [(t, kb) for t, kb, active in self.samples if active >= count]
        held = held[len(held) // 2 :]
        if len(held) < 2 or held[-1][0] - held[0][0] < 1.0:
            return None
        return (held[-1][1] - held[0][1]) / (held[-1][0] - held[0][0])

    def stop(self) -> None:
        self._stop_event.set()
        self.join(2)


def scenario_streams(env: Env) -> dict[str, Any]:
    """N concurrent SSE streams through each proxy: peak RSS and errors."""
    args = env.args
    result: dict[str, Any] = {"requested": args.streams, "hold_seconds": args.stream_hold}
    names = (["skyproxy"] if env.skyproxy else []) + ([] if args.no_streams_bare else ["bare"])
    for name in names:
        result[name] = stream_one_target(env, name)
    return result


def stream_one_target(env: Env, name: str) -> dict[str, Any]:
    args = env.args
    # Generous: a Python proxy opens a few hundred streams a second while it forwards the
    # events of those already open. Every stream ends by max_seconds after the first one
    # began (the upstream's deadline), all open or not.
    ramp_budget = max(30.0, args.streams / 50)
    max_seconds = ramp_budget + args.stream_hold
    client_timeout = max_seconds + 20
    env.check_time(f"streams ({name})", client_timeout + 60)

    _, hard = nofile_limits()
    # The proxy starts first (it connects to its upstream lazily): its idle fd count says
    # how many streams fit, since it needs two sockets per stream.
    up_port = free_port()
    if name == "skyproxy":
        # The default timeouts: a stream that keeps flowing is never cut, however long.
        proc, port, _ = start_skyproxy(env, f"{name}-streams", up_port)
    else:
        proc, port = start_bare(env, f"{name}-streams", up_port)
    base_fds = open_fds(proc.pid)
    margin = 32
    fit = (hard - base_fds - margin) // 2
    if name == "skyproxy":
        from skyproxy.daemon.fds import RESERVE

        # skyproxy caps its connections at (limit - RESERVE) / 2 and sheds past that: a
        # count above its cap would measure the shedding, not the streams.
        fit = min(fit, (hard - RESERVE) // 2)
    count = min(args.streams, fit)
    out: dict[str, Any] = {
        "requested": args.streams,
        "count": count,
        "nofile_hard": hard,
        "proxy_base_fds": base_fds,
    }
    if count < args.streams:
        out["limited_by"] = (
            f"RLIMIT_NOFILE hard limit {hard}: the proxy needs 2 sockets per stream + "
            f"{base_fds} fds, so at most {fit} streams fit"
        )
        log(f"streams: {out['limited_by']}; running {count}")
    # The upstream holds every stream open until `count` are open at once, then
    # --seconds more; --max-seconds bounds it when the proxy never gets there.
    up_cmd = [
        PYTHON,
        "-m",
        "bench.upstreams",
        "trickle",
        "--port",
        str(up_port),
        "--seconds",
        str(args.stream_hold),
        "--max-seconds",
        str(max_seconds),
        "--expect",
        str(count),
    ]
    up = env.procs.start(f"upstream-trickle-{name}", up_cmd, env.cpus.load, env.cpus, env.child_env)
    wait_http(f"http://127.0.0.1:{up_port}/-/health", up)
    time.sleep(1.0)
    out["idle_rss_kb"] = tree_kb(proc.pid)
    sampler = RssSampler(proc.pid, stats_url=f"http://127.0.0.1:{up_port}/-/stats")
    sampler.start()
    client_cmd = [
        PYTHON,
        "-m",
        "bench.streams",
        "--url",
        f"http://127.0.0.1:{port}/v1/chat/completions",
        "--count",
        str(count),
        "--procs",
        str(args.stream_procs),
        "--rate",
        str(args.stream_rate),
        "--timeout",
        str(client_timeout),
    ]
    log(f"streams: {count} through {name} (hold {args.stream_hold:g}s once all are open)")
    client = env.procs.start(f"streams-client-{name}", client_cmd, env.cpus.load, env.cpus, env.child_env)
    cpu_before = cpu_seconds(proc.pid)
    try:
        client.popen.wait(timeout=client_timeout + 30)
    except subprocess.TimeoutExpired:
        out["client_timeout"] = True
        env.procs.stop(client, grace=20.0)  # SIGTERM: the client prints what it has
    sampler.stop()
    out["proxy_cpu_seconds"] = round(cpu_seconds(proc.pid) - cpu_before, 2)
    client_out = [ln for ln in client.log_path.read_text(errors="replace").splitlines() if ln.startswith("{")]
    out["client"] = json.loads(client_out[-1]) if client_out else {"error": client.log_tail()}
    with contextlib.suppress(OSError, ValueError):
        out["upstream"] = json.loads(http("GET", f"http://127.0.0.1:{up_port}/-/stats")[1])
    out["peak_rss_kb"] = max(sampler.peak_kb, read_status_kb(proc.pid, "VmHWM"))
    out["final_rss_kb"] = tree_kb(proc.pid)
    out["rss_timeline"] = sampler.samples[:: max(1, len(sampler.samples) // 120)]
    out["proxy_alive"] = proc.popen.poll() is None
    if not out["proxy_alive"]:
        out["proxy_log_tail"] = proc.log_tail()
    env.procs.stop(client)
    env.procs.stop(proc)
    env.procs.stop(up)
    peak_open = out.get("upstream", {}).get("peak", 0)
    out["peak_open"] = peak_open
    per_stream = (out["peak_rss_kb"] - out["idle_rss_kb"]) / count if count else 0.0
    out["kb_per_stream"] = round(per_stream, 2)
    out["extrapolated_peak_rss_kb_at_target"] = round(out["idle_rss_kb"] + per_stream * TARGET_STREAMS)
    events = out["client"].get("events", 0)
    growth = sampler.growth_while_all_open(count)
    out["rss_growth_kb_per_s_while_held"] = round(growth, 1) if growth is not None else None
    # Proxy CPU per forwarded SSE event (stream opens included): the cost of holding streams.
    out["proxy_cpu_us_per_event"] = round(out["proxy_cpu_seconds"] * 1e6 / events, 1) if events else None
    out["max_seconds"] = max_seconds
    c = out["client"]
    log(
        f"streams {name}: {c.get('completed', 0)}/{count} completed, {c.get('errors', '?')} "
        f"errors, peak open {peak_open}, peak RSS {out['peak_rss_kb'] / 1024:.0f} MB"
    )
    return out


def run_python_snippet(env: Env, module: str, timeout: float) -> dict[str, Any]:
    """Call ``bench.<module>.run()`` in a fresh interpreter on the proxy's core."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"from bench.{module} import run\n"
        "result = run()\n"
        "print('BENCH_RESULT ' + json.dumps(result, default=str), flush=True)\n"
    )
    cmd = [*env.cpus.prefix(env.cpus.proxy), PYTHON, "-c", code]
    log_path = env.workdir / f"{module}.log"
    env.check_time(module, 10)
    with open(log_path, "wb") as log_file:
        popen = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=log_file,
            cwd=ROOT,
            env=env.child_env,
            start_new_session=True,
        )
        proc = Proc(module, popen, log_path)
        env.procs.procs.append(proc)
        try:
            stdout, _ = popen.communicate(timeout=min(timeout, env.remaining()))
        except subprocess.TimeoutExpired as exc:
            env.procs.stop(proc)
            raise BenchError(f"{module}.run() did not finish in {timeout:.0f}s") from exc
        finally:
            env.procs.stop(proc)
    text = stdout.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if popen.returncode != 0 or line is None:
        raise BenchError(f"{module}.run() failed ({popen.returncode}): {text[-500:]}\n{proc.log_tail()}")
    result = json.loads(line.removeprefix("BENCH_RESULT "))
    return result if isinstance(result, dict) else {"result": result}


def scenario_limiter(env: Env) -> dict[str, Any]:
    if not (BENCH_DIR / "limiter_memory.py").exists():
        raise BenchError("bench/limiter_memory.py is missing")
    return run_python_snippet(env, "limiter_memory", env.args.module_timeout)


def scenario_audit(env: Env) -> dict[str, Any]:
    if not (BENCH_DIR / "audit_throughput.py").exists():
        raise BenchError("bench/audit_throughput.py is missing")
    return run_python_snippet(env, "audit_throughput", env.args.module_timeout)


def scenario_webhooks(env: Env) -> dict[str, Any]:
    """The receiver's events/s (verified, committed) and the relay's latency, via a real daemon."""
    args = env.args
    env.check_time("webhooks", 90 + args.rounds * (args.duration + 20))
    _, upstream_port, upstream_kind = start_upstream_fast(env, "upstream-webhooks")
    hook_port, target_port = free_port(), free_port()
    proc, port, audit_dir = start_skyproxy(
        env, "skyproxy-webhooks", upstream_port, extra=webhooks_table(hook_port)
    )
    receiver = f"http://127.0.0.1:{hook_port}"
    wait_http(receiver + "/-/health", proc)
    store = audit_dir.parent / "state" / "webhooks.sqlite3"
    out: dict[str, Any] = {
        "upstream": upstream_kind,
        "store_filesystem": filesystem_type(store.parent),
        "routes": args.webhook_routes,
    }
    target = ["--target-port", str(target_port)]
    made = _webhook_client(
        env, ["routes", "--proxy", f"http://127.0.0.1:{port}", "--count", str(args.webhook_routes), *target]
    )
    if made["failed"]:
        raise BenchError(f"{made['failed']} of {args.webhook_routes} creates with a webhook failed")
    hooks = ["--receiver", receiver, "--store", str(store), *target]
    out["latency"] = _webhook_client(env, ["latency", *hooks, "--events", str(args.webhook_events)])
    log(
        f"webhooks latency: receiver p50 {out['latency']['receiver_ms']['p50']:.2f} ms, "
        f"relay p50 {out['latency']['relay_ms']['p50']:.2f} ms p99 {out['latency']['relay_ms']['p99']:.2f} ms"
    )
    rounds = []
    for _ in range(args.rounds):
        cpu = cpu_seconds(proc.pid)
        result = _webhook_client(
            env,
            [
                "throughput",
                *hooks,
                "--seconds",
                f"{args.duration:g}",
                "--concurrency",
                str(args.webhook_concurrency),
            ],
        )
        cpu = cpu_seconds(proc.pid) - cpu  # receiving and relaying, the drain included
        accepted = result["accepted"]
        result["proxy_cpu_us_per_event"] = round(cpu * 1e6 / accepted, 1) if accepted else None
        rounds.append(result)
        log(
            f"webhooks throughput: {result['events_per_second']:,.0f} events/s, "
            f"{result['committed']:,} committed, {result['relayed']:,} relayed"
        )
    env.procs.stop(proc)
    out["rounds"] = rounds
    out["summary"] = {
        "events_per_second": spread([r["events_per_second"] for r in rounds]),
        "proxy_cpu_us_per_event": spread([r["proxy_cpu_us_per_event"] or 0.0 for r in rounds]),
    }
    out["store_bytes"] = sum(f.stat().st_size for f in store.parent.glob(store.name + "*"))
    return out


def filesystem_type(path: Path) -> str:
    try:
        done = subprocess.run(
            ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def _webhook_client(env: Env, argv: list[str]) -> dict[str, Any]:
    """One `bench.webhooks` command on the load core; its JSON result."""
    from bench.webhooks import DRAIN_TIMEOUT

    cmd = [*env.cpus.prefix(env.cpus.load), PYTHON, "-m", "bench.webhooks", *argv]
    timeout = min(env.args.duration + DRAIN_TIMEOUT + 120, env.remaining())
    done = subprocess.run(cmd, cwd=ROOT, env=env.child_env, capture_output=True, timeout=timeout)
    text = done.stdout.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"bench.webhooks {argv[0]} failed: {(text + done.stderr.decode())[-500:]}")
    result: dict[str, Any] = json.loads(line.removeprefix("BENCH_RESULT "))
    return result


INSTRUCTION_TARGETS = (
    "bare",
    "skyproxy",
    "skyproxy-access",
    "skyproxy-priced",
    "skyproxy-off",
    "skyproxy-noscan",
    "skyproxy-webhooks",
    "reference",
)


# What each target adds to the skyproxy config: a `[webhooks]` table on a free port, or
# the same `[pricing]` as skyproxy-access without its tokens and budget.
_INSTRUCTION_EXTRAS: dict[str, Callable[[], str]] = {
    "skyproxy-webhooks": lambda: webhooks_table(free_port()),
    "skyproxy-priced": lambda: PRICING_CONFIG,
}


def scenario_instructions(env: Env) -> dict[str, Any]:
    """Instructions per create and per get, for bare and each skyproxy config, under callgrind."""
    from bench import instructions

    why_not = instructions.available()
    if why_not:
        return {"skipped": why_not}
    requests, concurrency = env.args.instructions_requests, 16
    _, upstream_port, upstream_kind = start_upstream_fast(env, "upstream-fast")
    out: dict[str, Any] = {"requests": requests, "concurrency": concurrency, "upstream": upstream_kind}
    creates: dict[str, float] = {}
    gets: dict[str, float] = {}
    chosen = set(env.args.instruction_targets.split(","))
    for name in INSTRUCTION_TARGETS:
        if name not in chosen:
            continue
        if (name != "bare" and not env.skyproxy) or (name == "reference" and not env.args.reference):
            continue
        env.check_time(f"instructions {name}", 180)
        try:
            creates[name], gets[name] = _count_instructions(env, name, upstream_port, requests, concurrency)
        except BenchError as exc:
            # One target that cannot run (say an older skyproxy without [webhooks]) leaves
            # the others' counts standing.
            log(f"instructions {name} failed: {exc}")
            out.setdefault("errors", {})[name] = str(exc).splitlines()[0][:300]
            continue
        finally:
            env.child_env.pop(TOKEN_ENV, None)
        log(
            f"instructions {name}: {creates[name] / 1000:,.0f}k per create, {gets[name] / 1000:,.0f}k per get"
        )
    out["per_request"] = {name: round(count) for name, count in creates.items()}
    out["per_get"] = {name: round(count) for name, count in gets.items()}
    for key, counts in (("ratios", creates), ("get_ratios", gets)):
        if "bare" in counts:
            out[key] = {
                name: round(count / counts["bare"], 3) for name, count in counts.items() if name != "bare"
            }
    if "skyproxy" in creates and "skyproxy-access" in creates:
        # Tokens and budgets against neither, in the same run.
        out["access_cost"] = round(creates["skyproxy-access"] / creates["skyproxy"], 3)
    if "skyproxy-priced" in creates and "skyproxy-access" in creates:
        # The same, against neither with the same [pricing]: the audit's cost estimates
        # predate tokens and budgets, and a team pricing its models pays for them already.
        out["access_cost_priced"] = round(creates["skyproxy-access"] / creates["skyproxy-priced"], 3)
    if "skyproxy" in creates and "skyproxy-noscan" in creates:
        out["scan_ratio"] = round(creates["skyproxy"] / creates["skyproxy-noscan"], 4)
    for key, name, base in (
        ("webhooks_cost", "skyproxy-webhooks", "skyproxy"),
        ("reference_cost", "skyproxy", "reference"),
    ):
        if name in creates and base in creates:
            out[key] = {
                "create": round(creates[name] / creates[base], 3),
                "get": round(gets[name] / gets[base], 3),
            }
    return out


def _count_instructions(
    env: Env, name: str, upstream_port: int, requests: int, concurrency: int
) -> tuple[float, float]:
    """Instructions per create and per get for one target, started under callgrind."""
    from bench import instructions

    out_file = env.workdir / f"callgrind-{name}.out"
    wrap = instructions.wrap(out_file)
    if name == "bare":
        proc, port = start_bare(env, name, upstream_port, wrap=wrap, deadline_s=120.0)
    else:
        proc, port, _ = start_skyproxy(
            env,
            name,
            upstream_port,
            features=name != "skyproxy-off",
            wrap=wrap,
            deadline_s=120.0,
            access=name == "skyproxy-access",
            extra=_INSTRUCTION_EXTRAS.get(name, str)(),
            scan=name != "skyproxy-noscan",
            source=env.args.reference if name == "reference" else None,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        warm = max(requests // 5, 100)
        for kind in ("create", "get"):  # warm up, not counted
            _instruction_load(env, url, warm, concurrency, kind)
        # Each dump holds what ran since the one before: the first the creates, the second the gets.
        instructions.control(proc.pid, "-i", "on")
        _instruction_load(env, url, requests, concurrency, "create")
        instructions.control(proc.pid, "-d")
        _instruction_load(env, url, requests, concurrency, "get")
        instructions.control(proc.pid, "-d")
        instructions.control(proc.pid, "-i", "off")
    finally:
        env.procs.stop(proc)
    try:
        return (
            instructions.dumped_total(out_file, 0) / requests,
            instructions.dumped_total(out_file, 1) / requests,
        )
    except RuntimeError as exc:
        raise BenchError(str(exc)) from exc


def _instruction_load(env: Env, url: str, requests: int, concurrency: int, kind: str) -> None:
    cmd = [
        *env.cpus.prefix(env.cpus.load),
        PYTHON,
        "-m",
        "bench.instructions",
        "load",
        "--url",
        url,
        "--kind",
        kind,
        "--requests",
        str(requests),
        "--concurrency",
        str(concurrency),
    ]
    done = subprocess.run(
        cmd, cwd=ROOT, env=env.child_env, capture_output=True, timeout=min(600.0, env.remaining())
    )
    if done.returncode != 0:
        raise BenchError(f"instruction load failed: {(done.stdout + done.stderr).decode()[-300:]}")


def time_command(cmd: list[str], runs: int, env: dict[str, str]) -> dict[str, Any]:
    """Wall time of ``cmd`` in ms: one warm-up run (page cache), then ``runs`` runs."""
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, timeout=60, env=env, check=False)
        times.append((time.perf_counter() - start) * 1000)
    return {
        "command": " ".join(cmd),
        "returncode": first.returncode,
        "output": (first.stdout + first.stderr).strip()[:200],
        "ms": spread(times),
        "runs_ms": [round(t, 1) for t in times],
    }


def _scenario_redis(env: Env) -> dict[str, Any]:
    from bench.cluster import scenario_redis  # it imports this module's helpers

    return scenario_redis(env)


def _scenario_dashboard(env: Env) -> dict[str, Any]:
    from bench.dashboard import scenario_dashboard  # it imports this module's helpers

    return scenario_dashboard(env)


def _scenario_opcodes(env: Env) -> dict[str, Any]:
    from bench.opcodes import scenario

    return scenario(env)


def _scenario_dashboard_instructions(env: Env) -> dict[str, Any]:
    from bench.dashboard import scenario_dashboard_instructions

    return scenario_dashboard_instructions(env)


def scenario_coldstart(env: Env) -> dict[str, Any]:
    env.check_time("coldstart", 30)
    runs = env.args.coldstart_runs
    result: dict[str, Any] = {
        "python -c pass": time_command([PYTHON, "-c", "pass"], runs, env.child_env),
        "python -c 'import aiohttp'": time_command([PYTHON, "-c", "import aiohttp"], runs, env.child_env),
    }
    if env.skyproxy:
        result["skyproxy --version"] = time_command([env.skyproxy, "--version"], runs, env.child_env)
    return result


# --- verdicts and report ---------------------------------------------------------------


@dataclass
class Verdict:
    name: str
    status: str  # PASS, FAIL, SKIP
    value: str
    target: str
    note: str = ""


def find_number(data: Any, *keys: str) -> float | None:
    """The first of ``keys`` found anywhere in a nested dict (other benches' run() output)."""
    if isinstance(data, dict):
        for key in keys:
            if key in data and isinstance(data[key], (int, float)) and not isinstance(data[key], bool):
                return float(data[key])
        for value in data.values():
            found = find_number(value, *keys)
            if found is not None:
                return found
    return None


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    out: list[Verdict] = []

    def skip(name: str, target: str, why: str) -> None:
        out.append(Verdict(name, "SKIP", "-", target, why))

    tp = results.get("throughput")
    t_tp = f">= {TARGET_THROUGHPUT_RATIO:.2f}x bare"
    t_p50 = f"<= {TARGET_P50_RATIO:.2f}x bare"
    if isinstance(tp, dict) and "skyproxy" in tp.get("ratios", {}):
        r = tp["ratios"]["skyproxy"]
        errors = tp["summary"]["skyproxy"]["errors"]
        note = (
            f"per round {r['throughput_per_round']['min']:.2f}-{r['throughput_per_round']['max']:.2f}; "
            f"proxy CPU per request {r['cpu_per_request']:.2f}x bare"
        )
        if errors:
            note += f"; {errors} wrk errors"
        ok = r["throughput"] >= TARGET_THROUGHPUT_RATIO and not errors
        out.append(
            Verdict(
                "throughput, all features on (64 conns)",
                "PASS" if ok else "FAIL",
                f"{r['throughput']:.2f}x",
                t_tp,
                note,
            )
        )
        ok = r["p50_c1"] <= TARGET_P50_RATIO and not errors
        note = f"per round {r['p50_c1_per_round']['min']:.2f}-{r['p50_c1_per_round']['max']:.2f}"
        out.append(
            Verdict("p50 latency (1 conn)", "PASS" if ok else "FAIL", f"{r['p50_c1']:.2f}x", t_p50, note)
        )
    else:
        why = _skip_reason(tp, "skyproxy not measured")
        skip("throughput, all features on (64 conns)", t_tp, why)
        skip("p50 latency (1 conn)", t_p50, why)

    idle = results.get("idle")
    t_idle = f"<= {TARGET_IDLE_RSS_MB:.0f} MB"
    if isinstance(idle, dict) and "skyproxy" in idle:
        mb = idle["skyproxy"]["rss_kb"] / 1024
        note = f"bare {idle['bare']['rss_kb'] / 1024:.1f} MB" if "bare" in idle else ""
        out.append(
            Verdict("idle RSS", "PASS" if mb <= TARGET_IDLE_RSS_MB else "FAIL", f"{mb:.1f} MB", t_idle, note)
        )
    else:
        skip("idle RSS", t_idle, _skip_reason(idle, "skyproxy not measured"))

    st = results.get("streams")
    t_st = f"{TARGET_STREAMS:,} open, RSS <= {TARGET_STREAMS_RSS_MB:.0f} MB, 0 errors"
    if isinstance(st, dict) and isinstance(st.get("skyproxy"), dict):
        s = st["skyproxy"]
        client = s.get("client", {})
        errors = client.get("errors", -1)
        completed = client.get("completed", 0)
        peak_mb = s["peak_rss_kb"] / 1024
        scaled = s["count"] < TARGET_STREAMS
        judged_mb = (s["idle_rss_kb"] + s["kb_per_stream"] * TARGET_STREAMS) / 1024 if scaled else peak_mb
        all_open = s.get("peak_open", 0) >= s["count"]
        ok = errors == 0 and completed == s["count"] and all_open and judged_mb <= TARGET_STREAMS_RSS_MB
        value = f"{s['peak_open']:,} open, {peak_mb:.0f} MB, {errors} errors"
        notes = [f"{completed:,}/{s['count']:,} completed"]
        if scaled:
            why = f" (fd hard limit {s['nofile_hard']})" if s["count"] < s["requested"] else ""
            notes.append(
                f"ran {s['count']:,}{why}: judged on {judged_mb:.0f} MB, "
                f"RSS extrapolated linearly to {TARGET_STREAMS:,}"
            )
        if not all_open:
            notes.append(f"never {s['count']:,} open at once")
        growth = s.get("rss_growth_kb_per_s_while_held")
        if growth:
            notes.append(f"RSS grew {growth / 1024:.2f} MB/s while all were held open")
        if isinstance(st.get("bare"), dict):
            notes.append(f"bare {st['bare']['peak_rss_kb'] / 1024:.0f} MB")
        out.append(Verdict("open streams", "PASS" if ok else "FAIL", value, t_st, "; ".join(notes)))
    else:
        skip("open streams", t_st, _skip_reason(st, "skyproxy not measured"))

    lim = results.get("limiter")
    t_lim = f"<= {TARGET_LIMITER_GROWTH_PCT:.0f}% growth"
    # limiter_memory.run() reports growth_ratio_second_million as a fraction (0.05 = 5%).
    growth = find_number(lim, "second_million_growth_pct", "growth_pct")
    if growth is None:
        frac = find_number(lim, "growth_ratio_second_million", "second_million_growth", "growth_ratio")
        growth = frac * 100 if frac is not None else None
    if growth is not None:
        ok = growth <= TARGET_LIMITER_GROWTH_PCT
        per_bucket = find_number(lim, "bytes_per_bucket")
        lim_note = f"{per_bucket:.0f} bytes/bucket" if per_bucket is not None else ""
        out.append(
            Verdict(
                "limiter, second million growth", "PASS" if ok else "FAIL", f"{growth:.1f}%", t_lim, lim_note
            )
        )
    else:
        skip("limiter, second million growth", t_lim, _skip_reason(lim, "no growth figure in run()"))
    # Judged on the worst collection's CPU time: that is the stall the users' state can
    # cause, and unlike the ticks' lateness it does not count time the process spent
    # descheduled, which on a shared machine is most of it (see the no-users figure).
    t_stall = f"p99.9 <= {TARGET_LIMITER_STALL_P999_MS:.0f} ms (worst collection, CPU)"
    pause = find_number(lim, "gc_pause_cpu_max_ms")
    ticks = find_number(lim, "loop_stall_p999_ms")
    if pause is not None and ticks is not None:
        ok = pause <= TARGET_LIMITER_STALL_P999_MS
        value = f"GC <= {pause:.1f} ms, ticks p99.9 {ticks:.1f} ms"
        alone = find_number(lim.get("no_users"), "loop_stall_p999_ms") if isinstance(lim, dict) else None
        note = f"ticks p99.9 {alone:.1f} ms with no users" if alone is not None else ""
        verdict = "PASS" if ok else "FAIL"
        out.append(Verdict("limiter, 1M users loop stall", verdict, value, t_stall, note))
    else:
        skip("limiter, 1M users loop stall", t_stall, _skip_reason(lim, "no stall figure in run()"))

    au = results.get("audit")
    t_au = f">= {TARGET_AUDIT_LINES_PER_S:,.0f} lines/s, p99 stall <= {TARGET_AUDIT_STALL_P99_MS:.0f} ms"
    rate = find_number(au, "lines_per_second", "lines_per_s", "lines_per_sec", "rate")
    stall = find_number(au, "stall_p99_ms", "p99_stall_ms", "loop_stall_p99_ms", "max_stall_p99_ms")
    if rate is not None and stall is not None:
        ok = rate >= TARGET_AUDIT_LINES_PER_S and stall <= TARGET_AUDIT_STALL_P99_MS
        worst = find_number(au, "stall_max_ms", "max_stall_ms", "worst_stall_ms")
        note = f"worst stall {worst:.1f} ms" if worst is not None else ""
        out.append(
            Verdict(
                "audit writer",
                "PASS" if ok else "FAIL",
                f"{rate:,.0f} lines/s, p99 stall {stall:.2f} ms",
                t_au,
                note,
            )
        )
    else:
        skip("audit writer", t_au, _skip_reason(au, "no lines/s or stall figure in run()"))

    out.extend(_webhook_verdicts(results))

    cs = results.get("coldstart")
    t_cs = f"<= {TARGET_COLD_START_MS:.0f} ms"
    if isinstance(cs, dict) and "skyproxy --version" in cs:
        v = cs["skyproxy --version"]
        ms = v["ms"]["median"]
        ok = ms <= TARGET_COLD_START_MS and v["returncode"] == 0
        note = f"python -c pass {cs['python -c pass']['ms']['median']:.0f} ms"
        if v["returncode"]:
            note += f"; exit {v['returncode']}"
        out.append(Verdict("--version cold start", "PASS" if ok else "FAIL", f"{ms:.0f} ms", t_cs, note))
    else:
        skip("--version cold start", t_cs, _skip_reason(cs, "skyproxy not measured"))
    out.extend(_scan_verdicts(results))
    return out


def _scan_verdicts(results: dict[str, Any]) -> list[Verdict]:
    """The key search in success bodies against the same proxy without it (scan_success_bodies),
    and client tokens plus a budget against the same proxy with neither (issue 12)."""
    return [
        *_cost_verdicts(
            results,
            "key scan",
            "without",
            ("skyproxy-vs-noscan", TARGET_SCAN_THROUGHPUT_RATIO),
            ("scan_ratio", TARGET_SCAN_INSTRUCTIONS_RATIO),
        ),
        *_cost_verdicts(
            results,
            "tokens + budget",
            "neither",
            ("access-vs-skyproxy", TARGET_ACCESS_THROUGHPUT_RATIO),
            ("access_cost", TARGET_ACCESS_INSTRUCTIONS_RATIO),
        ),
    ]


def _cost_verdicts(
    results: dict[str, Any],
    label: str,
    against: str,
    throughput: tuple[str, float],
    instructions: tuple[str, float],
) -> list[Verdict]:
    """A feature's cost, same run: req/s at 64 connections (throughput's `ratios[key]`) and
    instructions per create (the instructions scenario's `key`), each against its target."""
    out: list[Verdict] = []
    tp = results.get("throughput")
    key, target = throughput
    t_tp = f">= {target:.2f}x {against}"
    ratios = tp.get("ratios", {}) if isinstance(tp, dict) else {}
    r = ratios.get(key)
    if r is not None:
        ok = r["throughput"] >= target
        note = (
            f"per round {r['throughput_per_round']['min']:.2f}-{r['throughput_per_round']['max']:.2f}; "
            f"proxy CPU per request {r['cpu_per_request']:.3f}x"
        )
        twin = ratios.get("skyproxy-vs-twin")
        if twin is not None:  # the noise floor the verdict is read against
            note += f"; A/A control {twin['throughput']:.3f}x (CPU {twin['cpu_per_request']:.3f}x)"
        value = f"{r['throughput']:.3f}x"
        out.append(Verdict(f"{label}, throughput", "PASS" if ok else "FAIL", value, t_tp, note))
    else:
        out.append(Verdict(f"{label}, throughput", "SKIP", "-", t_tp, _skip_reason(tp, "not measured")))
    ins = results.get("instructions")
    key, target = instructions
    t_ins = f"<= {target:.2f}x {against}"
    if isinstance(ins, dict) and key in ins:
        ok = ins[key] <= target
        value = f"{ins[key]:.3f}x"
        out.append(Verdict(f"{label}, instructions", "PASS" if ok else "FAIL", value, t_ins, ""))
    else:
        out.append(Verdict(f"{label}, instructions", "SKIP", "-", t_ins, _skip_reason(ins, "not measured")))
    return out


def _webhook_verdicts(results: dict[str, Any]) -> list[Verdict]:
    out = []
    wh = results.get("webhooks")
    t_wh = "every 2xx committed and relayed once, signatures valid"
    if isinstance(wh, dict) and wh.get("rounds"):
        lat = wh["latency"]
        lost = [
            r
            for r in wh["rounds"]
            if r["refused"] or r["committed"] != r["accepted"] or r["relayed"] != r["accepted"]
        ]
        bad = lat["bad_signatures"] + sum(r["bad_signatures"] for r in wh["rounds"])
        ok = not lost and not bad and not lat["failed"]
        eps = wh["summary"]["events_per_second"]["median"]
        value = f"{eps:,.0f} events/s, relay p99 {lat['relay_ms']['p99']:.1f} ms"
        note = (
            f"receiver p50 {lat['receiver_ms']['p50']:.1f} ms p99 {lat['receiver_ms']['p99']:.1f} ms, "
            f"relay p50 {lat['relay_ms']['p50']:.1f} ms; store on {wh['store_filesystem'] or '?'}"
        )
        if lost:
            note += f"; {len(lost)} round(s) with refused, uncommitted or unrelayed events"
        if bad:
            note += f"; {bad} bad relay signatures"
        out.append(Verdict("webhooks receiver and relay", "PASS" if ok else "FAIL", value, t_wh, note))
    else:
        out.append(
            Verdict("webhooks receiver and relay", "SKIP", "-", t_wh, _skip_reason(wh, "not measured"))
        )
    ins = results.get("instructions")
    t_cost = f"<= {TARGET_WEBHOOKS_COST:.2f}x without [webhooks]"
    cost = ins.get("webhooks_cost") if isinstance(ins, dict) else None
    if cost:
        ok = max(cost.values()) <= TARGET_WEBHOOKS_COST
        value = f"create {cost['create']:.3f}x, get {cost['get']:.3f}x"
        out.append(Verdict("[webhooks] cost, instructions", "PASS" if ok else "FAIL", value, t_cost))
    else:
        why = (
            ins["skipped"]
            if isinstance(ins, dict) and "skipped" in ins
            else _skip_reason(ins, "not measured")
        )
        out.append(Verdict("[webhooks] cost, instructions", "SKIP", "-", t_cost, why))
    ref = ins.get("reference_cost") if isinstance(ins, dict) else None
    if ref:
        # The tree under test against --reference (say main before a change), same run.
        t_ref = f"<= {TARGET_WEBHOOKS_COST:.2f}x --reference"
        ok = max(ref.values()) <= TARGET_WEBHOOKS_COST
        value = f"create {ref['create']:.3f}x, get {ref['get']:.3f}x"
        out.append(Verdict("skyproxy against --reference", "PASS" if ok else "FAIL", value, t_ref))
    return out


def _skip_reason(section: Any, default: str) -> str:
    if section is None:
        return "scenario not run"
    if isinstance(section, dict) and "error" in section:
        return str(section["error"]).splitlines()[0][:120]
    return default


def _print_webhooks(wh: Any) -> None:
    if not isinstance(wh, dict) or not wh.get("rounds"):
        return
    lat = wh["latency"]
    s = wh["summary"]
    print(
        f"\nwebhooks through a daemon (store on {wh['store_filesystem'] or '?'}, {wh['routes']} routes, "
        f"one local app target)"
    )
    print(
        f"  receiver: {fmt_spread(s['events_per_second'])} events/s verified and committed "
        f"at {wh['rounds'][0]['concurrency']} in flight; proxy CPU "
        f"{fmt_spread(s['proxy_cpu_us_per_event'])} µs/event, relay included"
    )
    print(
        "  one at a time ("
        + f"{lat['events']} events): "
        + "; ".join(
            f"{name} p50 {lat[key]['p50']:.2f} ms p99 {lat[key]['p99']:.2f} ms"
            for name, key in (
                ("receiver 2xx", "receiver_ms"),
                ("2xx to app", "relay_ms"),
                ("end to end", "end_to_end_ms"),
            )
        )
    )
    for r in wh["rounds"]:
        print(
            f"  round: {r['accepted']:,} accepted, {r['committed']:,} committed, {r['relayed_by_end']:,} "
            f"relayed by the end, all {r['relayed']:,} after {r['drain_seconds']} s more; "
            f"refused {r['refused'] or 0}"
        )


def fmt_spread(s: dict[str, float], unit: str = "", digits: int = 0) -> str:
    return f"{s['median']:,.{digits}f}{unit} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def print_report(results: dict[str, Any], vs: list[Verdict], path: Path | None) -> None:
    p = print
    opts = results["options"]
    p()
    p(
        f"skyproxy bench  {results['started_at']}  "
        f"host {results['host']['cpus']} cpus, {results['host']['kernel']}"
    )
    pin = results["pinning"]
    p(
        f"rounds {opts['rounds']} x {opts['duration']:g}s, interleaved; "
        + (
            f"proxy on cpu {pin['proxy']}, load+upstream on cpu {pin['load']}"
            if pin["proxy"] is not None
            else "no CPU pinning"
        )
        + (f"; nice {pin['nice']}" if pin.get("nice") else "")
    )
    tp = results.get("throughput")
    if isinstance(tp, dict) and "summary" in tp:
        p(f"\nupstream: {tp['upstream']} (canned 201 prediction)")
        p(
            f"{'target':<16}{'req/s @64 conns':>26}{'proxy CPU µs/req @64':>24}"
            f"{'p50 µs @1 conn':>20}{'p99 µs @1 conn':>24}  errors"
        )
        for name in tp["targets"]:
            s = tp["summary"][name]
            p(
                f"{name:<16}{fmt_spread(s['rps_c64']):>26}{fmt_spread(s['cpu_us_per_request_c64']):>24}"
                f"{fmt_spread(s['p50_us_c1']):>20}{fmt_spread(s['p99_us_c1']):>24}  {s['errors']}"
            )
        p("  (median of rounds, min-max in brackets)")
        for name, r in tp["ratios"].items():
            if name in COST_RATIOS:
                what = COST_RATIOS[name]
                p(
                    f"{what} (same run): throughput {r['throughput']:.3f}x "
                    f"[{r['throughput_per_round']['min']:.2f}-{r['throughput_per_round']['max']:.2f}], "
                    f"CPU per request {r['cpu_per_request']:.3f}x"
                )
                continue
            if name == "access-vs-skyproxy":
                p(
                    f"tokens+budgets / neither (same run): throughput {r['throughput']:.2f}x "
                    f"[{r['throughput_per_round']['min']:.2f}-{r['throughput_per_round']['max']:.2f}], "
                    f"CPU per request {r['cpu_per_request']:.2f}x"
                    + (
                        " (of it in the kernel: {} vs {} µs; page faults per request {} vs {})".format(
                            *r["sys_us_per_request"], *r["faults_per_request"]
                        )
                        if "faults_per_request" in r
                        else ""
                    )
                )
                continue
            p(
                f"{name} / bare (same run): throughput {r['throughput']:.2f}x "
                f"[{r['throughput_per_round']['min']:.2f}-{r['throughput_per_round']['max']:.2f}], "
                f"p50 {r['p50_c1']:.2f}x "
                f"[{r['p50_c1_per_round']['min']:.2f}-{r['p50_c1_per_round']['max']:.2f}], "
                f"p99 {r['p99_c1']:.2f}x, CPU per request {r['cpu_per_request']:.2f}x"
            )
        if "audit_lines" in tp:
            p(
                f"skyproxy audit lines written: {tp['audit_lines']:,} "
                f"for {tp['skyproxy_requests_sent']:,} requests"
            )
    elif isinstance(tp, dict):
        p(f"\nthroughput: {tp.get('error')}")
    st = results.get("streams")
    if isinstance(st, dict) and "error" not in st:
        p("\nopen streams (SSE, one event a second per stream)")
        for name in ("skyproxy", "bare"):
            x = st.get(name)
            if not isinstance(x, dict):
                continue
            c = x.get("client", {})
            cpu = x.get("proxy_cpu_us_per_event")
            p(
                f"  {name:<9} {c.get('completed', 0):,}/{x['count']:,} completed, "
                f"{c.get('errors', '?')} errors "
                f"{c.get('error_kinds') or ''}; peak open {x.get('peak_open', 0):,} "
                f"(all open after {x.get('upstream', {}).get('all_open_after')} s); "
                f"RSS idle {x['idle_rss_kb'] / 1024:.0f} MB, peak {x['peak_rss_kb'] / 1024:.0f} MB "
                f"({x['kb_per_stream']:.1f} kB/stream); "
                f"proxy CPU {cpu if cpu is not None else '-'} µs/event; "
                f"RSS growth while held {x.get('rss_growth_kb_per_s_while_held', '-')} kB/s"
            )
    _print_webhooks(results.get("webhooks"))
    for key in ("idle", "streams", "limiter", "audit", "webhooks", "coldstart", "instructions"):
        section = results.get(key)
        if isinstance(section, dict) and "error" in section:
            p(f"{key}: ERROR {section['error'].splitlines()[0]}")
    cs = results.get("coldstart")
    if isinstance(cs, dict) and "error" not in cs:
        p(
            "\ncold start (median ms, min-max): "
            + "; ".join(f"{k} {fmt_spread(v['ms'])}" for k, v in cs.items() if isinstance(v, dict))
        )
    ins = results.get("instructions")
    if isinstance(ins, dict) and "per_request" in ins:
        p(
            f"\nCPU instructions per request (callgrind, {ins['requests']:,} of each at concurrency "
            f"{ins['concurrency']}, deterministic):"
        )
        for what, key, ratio_key in (("create", "per_request", "ratios"), ("get", "per_get", "get_ratios")):
            ratios = ins.get(ratio_key, {})
            p(
                f"  {what:<7}"
                + ", ".join(
                    f"{name} {count / 1000:,.0f}k"
                    + (f" ({ratios[name]:.2f}x bare)" if name in ratios else "")
                    for name, count in ins.get(key, {}).items()
                )
            )
        for name, error in ins.get("errors", {}).items():
            p(f"  {name}: not counted, {error}")
        if "access_cost" in ins:
            p(f"tokens+budgets / neither (same run): {ins['access_cost']:.3f}x instructions per create")
        if "access_cost_priced" in ins:
            p(
                "tokens+budgets / neither with the same [pricing] (same run): "
                f"{ins['access_cost_priced']:.3f}x instructions per create"
            )
    elif isinstance(ins, dict) and "skipped" in ins:
        p(f"\ninstructions: skipped, {ins['skipped']}")
    ops = results.get("opcodes")
    if isinstance(ops, dict) and "per_request" in ops:
        from bench import opcodes

        p(f"\nPython bytecodes per request ({ops['requests']:,} of each at concurrency 16):")
        opcodes.report(ops, p)
    from bench import cluster

    cluster.print_report(results)
    p("\ntargets")
    for v in vs:
        line = f"  {v.status:<5} {v.name:<40} {v.value:<34} target {v.target}"
        p(line + (f"  ({v.note})" if v.note else ""))
    load = results["host"]
    p(
        f"\ntook {results['seconds']:.0f}s; load average at start {load['loadavg_start'][0]:.2f}, "
        f"at end {load['loadavg_end'][0]:.2f} (on {load['cpus']} cpus: above ~1.5 other work shared "
        "the machine; trust the ratios and CPU per request over raw req/s)"
    )
    if path:
        p(f"results: {path}")


# --- main ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 2s, 1,000 streams: a smoke run")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per target (default 3)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 5)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per target (default 2)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads at 64 conns (default 1)")
    parser.add_argument("--streams", type=int, help=f"open streams to hold (default {TARGET_STREAMS:,})")
    parser.add_argument(
        "--stream-hold", type=float, help="seconds streams stay open once all are (default 20)"
    )
    parser.add_argument("--stream-procs", type=int, default=4, help="client processes for the streams")
    parser.add_argument("--stream-rate", type=float, default=2000.0, help="max new streams per second")
    parser.add_argument(
        "--no-streams-bare", action="store_true", help="skip the bare reference in the streams scenario"
    )
    parser.add_argument(
        "--no-nginx", action="store_true", help="use the aiohttp upstream even if nginx is installed"
    )
    parser.add_argument("--no-nginx-proxy", action="store_true", help="do not measure nginx as a proxy")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--same-processes",
        action="store_true",
        help="throughput: keep each target's process for every round (default: a new one per round)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=-5,
        help="niceness of every process the bench starts (negative needs root; 0: leave as is)",
    )
    parser.add_argument("--coldstart-runs", type=int, help="runs per cold-start command (default 10)")
    parser.add_argument(
        "--instructions-requests", type=int, help="requests counted under callgrind per target (default 2000)"
    )
    parser.add_argument("--webhook-routes", type=int, default=100, help="routes the callbacks spread over")
    parser.add_argument("--webhook-events", type=int, help="callbacks timed one at a time (default 500)")
    parser.add_argument(
        "--webhook-concurrency", type=int, default=32, help="callbacks in flight in the throughput rounds"
    )
    parser.add_argument("--idle-settle", type=float, default=2.0, help="seconds before reading idle RSS")
    parser.add_argument("--module-timeout", type=float, default=300.0, help="bound on limiter/audit run()")
    parser.add_argument(
        "--scenarios",
        default=",".join(s for s in SCENARIOS if s not in OPT_IN_SCENARIOS),
        help=f"comma list of {', '.join(SCENARIOS)} (opcodes only when named)",
    )
    parser.add_argument("--skyproxy", help="the skyproxy executable (default: the venv's console script)")
    parser.add_argument(
        "--instruction-targets",
        default=",".join(INSTRUCTION_TARGETS),
        help=f"comma list of the instructions scenario's targets, of {', '.join(INSTRUCTION_TARGETS)}",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        help="another skyproxy source tree (say `git archive main`), counted in the instructions "
        "scenario as `reference` beside this one",
    )
    parser.add_argument(
        "--max-time", type=float, default=1800.0, help="seconds before the run gives up (default 1800)"
    )
    parser.add_argument("--output", type=Path, help="results file (default bench/results/<UTC time>.json)")
    parser.add_argument("--no-save", action="store_true", help="do not write a results file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "rounds": 1 if quick else 3,
        "duration": 2.0 if quick else 5.0,
        "warmup": 1.0 if quick else 2.0,
        "streams": 1000 if quick else TARGET_STREAMS,
        "stream_hold": 6.0 if quick else 20.0,
        "coldstart_runs": 5 if quick else 10,
        "instructions_requests": 500 if quick else 2000,
        "webhook_events": 100 if quick else 500,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenario_list) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    unknown = set(args.instruction_targets.split(",")) - set(INSTRUCTION_TARGETS)
    if unknown:
        parser.error(f"unknown instruction targets: {', '.join(sorted(unknown))}")
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be >= 1 and --duration > 0")
    return args


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("wrk") and "throughput" in args.scenario_list:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    started = time.monotonic()
    started_at = dt.datetime.now(dt.timezone.utc)
    cpus = Cpus.detect(not args.no_pin, args.nice)
    if cpus.pinned:
        # Keep this orchestrator off the proxy's core.
        os.sched_setaffinity(0, {cpus.load})  # type: ignore[arg-type]
    workdir = Path(tempfile.mkdtemp(prefix="skyproxy-bench-"))
    child_env = dict(os.environ)
    child_env[KEY_ENV] = BENCH_KEY
    child_env[SECRET_ENV] = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    child_env["PYTHONPATH"] = str(ROOT) + os.pathsep + child_env.get("PYTHONPATH", "")
    child_env.pop("PYTHONDONTWRITEBYTECODE", None)
    skyproxy = find_skyproxy(args.skyproxy)
    env = Env(args, cpus, Procs(workdir), workdir, time.monotonic() + args.max_time, skyproxy, child_env)
    soft, hard = nofile_limits()
    results: dict[str, Any] = {
        "schema": 1,
        "started_at": started_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "options": {
            k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list)) or v is None
        },
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "nofile": [soft, hard],
            "loadavg_start": os.getloadavg(),
        },
        "pinning": {"proxy": cpus.proxy, "load": cpus.load, "nice": cpus.nice},
        "versions": {
            "aiohttp": module_version("aiohttp"),
            "uvloop": module_version("uvloop"),
            "aiolimiter": module_version("aiolimiter"),
            "skyproxy": tool_version([skyproxy, "--version"]) if skyproxy else "",
            "nginx": tool_version(["nginx", "-v"]) if shutil.which("nginx") else "",
            "wrk": tool_version(["wrk", "-v"]) if shutil.which("wrk") else "",
        },
        "git": tool_version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "skyproxy_available": bool(skyproxy),
    }
    if not skyproxy:
        log("skyproxy is not available (skyproxy --help failed): running the references only")
    scenarios: dict[str, Callable[[Env], dict[str, Any]]] = {
        "throughput": scenario_throughput,
        "idle": scenario_idle,
        "streams": scenario_streams,
        "limiter": scenario_limiter,
        "audit": scenario_audit,
        "coldstart": scenario_coldstart,
        "webhooks": scenario_webhooks,
        "instructions": scenario_instructions,
        "redis": _scenario_redis,
        "dashboard": _scenario_dashboard,
        "dashboard-instructions": _scenario_dashboard_instructions,
        "opcodes": _scenario_opcodes,
    }
    interrupted = False
    try:
        with interrupt_on_sigterm():
            for name in SCENARIOS:
                if name not in args.scenario_list:
                    continue
                log(f"scenario {name}")
                t0 = time.monotonic()
                try:
                    results[name] = scenarios[name](env)
                except (BenchError, subprocess.SubprocessError, OSError, ValueError) as exc:
                    log(f"scenario {name} failed: {exc}")
                    results[name] = {"error": str(exc)}
                finally:
                    env.procs.stop_all()
                if isinstance(results.get(name), dict):
                    results[name]["seconds"] = round(time.monotonic() - t0, 1)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping every process")
    finally:
        env.procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir}")
    results["interrupted"] = interrupted
    results["seconds"] = round(time.monotonic() - started, 1)
    results["host"]["loadavg_end"] = os.getloadavg()
    from bench import cluster, dashboard

    vs = verdicts(results) + cluster.verdicts(results) + dashboard.verdicts(results)
    results["verdicts"] = [vars(v) for v in vs]
    path: Path | None = None
    if not args.no_save:
        path = args.output or RESULTS_DIR / (started_at.strftime("%Y-%m-%dT%H%M%SZ") + ".json")
        save(results, path)
    print_report(results, vs, path)
    if interrupted:
        return 130
    return 1 if any(v.status == "FAIL" for v in vs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
