"""The many-open-streams client: N concurrent streaming chat completions through a proxy.

    python -m bench.streams --url http://127.0.0.1:8801/v1/chat/completions \\
        --count 10000 --procs 4 --rate 1000 --timeout 180

It starts ``--procs`` worker processes (each raises RLIMIT_NOFILE to its hard limit and
uses one aiohttp ``ClientSession`` with ``limit=0``); together they open ``--count``
streams at up to ``--rate`` new streams per second, each worker with at most
``--max-opening`` streams connecting at once (the rest wait, so the ramp follows what
the proxy accepts instead of overflowing its listen backlog), and read every stream to
its end; ``--timeout`` seconds after the start, streams still open are given up and
counted as errors (SIGTERM does the same at once). A stream counts as completed when
the answer is 200 ``text/event-stream`` with at least one ``data:`` event and the final
``data: [DONE]``; anything else is an error, grouped by kind. The main process prints
one JSON object:
``{"count", "completed", "errors", "error_kinds", "opened_peak", "seconds", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import aiohttp

from bench.upstreams import new_event_loop, raise_nofile

BODY = {
    "model": "truefusion-pro",
    "stream": True,
    "messages": [{"role": "user", "content": "test"}],
}


class Counters:
    def __init__(self) -> None:
        self.completed = 0
        self.open = 0
        self.opened_peak = 0
        self.events = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.first_error: str = ""


async def one_stream(
    session: aiohttp.ClientSession,
    url: str,
    user: str,
    counters: Counters,
    opening: asyncio.Semaphore,
) -> None:
    opened = False
    try:
        async with opening:
            resp = await session.post(url, json=BODY, headers={"X-User-Id": user})
        async with resp:
            if resp.status != 200:
                await resp.read()
                counters.errors[f"status_{resp.status}"] += 1
                return
            opened = True
            counters.open += 1
            counters.opened_peak = max(counters.opened_peak, counters.open)
            events = 0
            done = False
            async for line in resp.content:
                if line.startswith(b"data:"):
                    if line.strip() == b"data: [DONE]":
                        done = True
                    else:
                        events += 1
            counters.events += events
            if done and events > 0:
                counters.completed += 1
            else:
                counters.errors["incomplete_stream"] += 1
    except asyncio.TimeoutError:
        counters.errors["timeout"] += 1
    except aiohttp.ClientError as exc:
        counters.errors[type(exc).__name__] += 1
        counters.first_error = counters.first_error or repr(exc)
    except OSError as exc:
        counters.errors[f"OSError_{exc.errno}"] += 1
        counters.first_error = counters.first_error or repr(exc)
    finally:
        if opened:
            counters.open -= 1


async def worker(
    url: str, count: int, rate: float, max_opening: int, timeout: float, index: int
) -> dict[str, Any]:
    """Open ``count`` streams and read them; after ``timeout`` seconds, give up on the rest."""
    counters = Counters()
    opening = asyncio.Semaphore(max_opening)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    started = time.monotonic()
    deadline = started + timeout
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[None]] = []
    ramp_seconds = 0.0
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def launch() -> None:
            interval = 1.0 / rate if rate > 0 else 0.0
            for i in range(count):
                user = f"stream-user-{index}-{i % 100}"
                tasks.append(asyncio.create_task(one_stream(session, url, user, counters, opening)))
                if interval:
                    # Sleep in batches: asyncio.sleep below ~1 ms is not precise anyway.
                    delay = started + (i + 1) * interval - time.monotonic()
                    if delay > 0.005:
                        await asyncio.sleep(delay)

        launcher = asyncio.create_task(launch())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([launcher, stopper], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        ramp_seconds = time.monotonic() - started
        everything: asyncio.Future[Any] = asyncio.gather(*tasks, return_exceptions=True)
        remaining = max(0.0, deadline - time.monotonic())
        waited: list[asyncio.Future[Any]] = [everything, stopper]
        await asyncio.wait(waited, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        unfinished = [t for t in tasks if not t.done()]
        for t in (*unfinished, launcher, stopper):
            t.cancel()
        await asyncio.gather(everything, launcher, stopper, return_exceptions=True)
    if unfinished:
        counters.errors["unfinished_at_deadline"] += len(unfinished)
    never_started = count - len(tasks)
    if never_started:
        counters.errors["never_started"] += never_started
    return {
        "count": count,
        "completed": counters.completed,
        "errors": sum(counters.errors.values()),
        "error_kinds": dict(counters.errors),
        "first_error": counters.first_error,
        "opened_peak": counters.opened_peak,
        "events": counters.events,
        "ramp_seconds": round(ramp_seconds, 3),
        "seconds": round(time.monotonic() - started, 3),
    }


def run_worker(args: argparse.Namespace) -> int:
    raise_nofile()
    loop = new_event_loop(args.loop)
    asyncio.set_event_loop(loop)
    try:
        result = loop.run_until_complete(
            worker(args.url, args.count, args.rate, args.max_opening, args.timeout, args.worker)
        )
    finally:
        loop.close()
    print(json.dumps(result), flush=True)
    return 0


def run_main(args: argparse.Namespace) -> int:
    procs = max(1, min(args.procs, args.count))
    shares = [args.count // procs + (1 if i < args.count % procs else 0) for i in range(procs)]
    started = time.monotonic()
    children = []
    for i, share in enumerate(shares):
        cmd = [
            sys.executable,
            "-m",
            "bench.streams",
            "--url",
            args.url,
            "--count",
            str(share),
            "--rate",
            str(args.rate / procs),
            "--max-opening",
            str(args.max_opening),
            "--timeout",
            str(args.timeout),
            "--loop",
            args.loop,
            "--worker",
            str(i),
        ]
        children.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    # On SIGTERM the workers (same process group) print what they have and exit; keep
    # collecting instead of dying with them.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        for child in children:
            out, _ = child.communicate(timeout=args.timeout + 60)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            if not lines:
                failures.append(f"worker exited {child.returncode} without a result")
                continue
            results.append(json.loads(lines[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    kinds: collections.Counter[str] = collections.Counter()
    for r in results:
        kinds.update(r["error_kinds"])
    missing = args.count - sum(r["count"] for r in results)
    if missing:
        kinds["worker_failed"] += missing
    summary = {
        "count": args.count,
        "procs": procs,
        "completed": sum(r["completed"] for r in results),
        "errors": sum(kinds.values()),
        "error_kinds": dict(kinds),
        "first_error": next((r["first_error"] for r in results if r["first_error"]), ""),
        "opened_peak_sum": sum(r["opened_peak"] for r in results),
        "events": sum(r["events"] for r in results),
        "ramp_seconds": max((r["ramp_seconds"] for r in results), default=0.0),
        "seconds": round(time.monotonic() - started, 3),
        "worker_failures": failures,
    }
    print(json.dumps(summary), flush=True)
    return 0 if not failures else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--rate", type=float, default=1000.0, help="new streams per second")
    parser.add_argument(
        "--max-opening",
        type=int,
        default=32,
        help="per worker: streams connecting but not yet answered (keeps the ramp within "
        "the proxy's listen backlog)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds from the start after which unfinished streams count as errors",
    )
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return run_worker(args) if args.worker >= 0 else run_main(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
