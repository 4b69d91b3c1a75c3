"""Webhooks through a real daemon: the receiver's throughput and the relay's latency.

The runner starts `skyproxy serve` with a `[webhooks]` table, its SQLite store on disk,
on the proxy's core. This client runs on the other core, in the role of Skytells (it
signs each callback with the environment's key, `X-Skytells-Signature`) and of the app
(a target that receives the relayed events and checks their Standard Webhooks
signature with the `whsec_` secret). Three commands, each printing one JSON line:

    routes      N creates through the proxy, each asking for a webhook to the app;
                the proxy records one route per create in the store.
    latency     one callback at a time: the receiver's answer (verified, committed,
                2xx) and then the app holding the relayed event, p50/p99 of both.
    throughput  C callbacks in flight for S seconds: events/s answered 2xx, which the
                receiver sends only after the commit; the store's event count must grow
                by exactly that. Then it waits until the app holds every one of them.

    python -m bench.webhooks routes --proxy http://127.0.0.1:P --target-port T --count 100
    python -m bench.webhooks throughput --receiver http://127.0.0.1:R --store S --target-port T

Bodies are bare prediction objects, two per prediction (processing, then succeeded: the
second writes the terminal audit line), each unique, so none is a duplicate.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import sqlite3
import statistics
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

KEY_ENV = "SKYPROXY_BENCH_KEY"
SECRET_ENV = "SKYPROXY_BENCH_WHSEC"
ENVIRONMENT = "bench"
DRAIN_TIMEOUT = 120.0  # seconds to wait for the relay to deliver every event of a run
CREATE = {"model": "truefusion-pro", "input": {"prompt": "test"}}


def prediction_body(run: str, i: int) -> bytes:
    """Callback i of a run: prediction i // 2, processing first and then succeeded."""
    pid = f"{run}-{i // 2:08d}"
    done = i % 2 == 1
    prediction = {
        "id": pid,
        "model": "truefusion-pro",
        "version": "2025-01",
        "status": "succeeded" if done else "processing",
        "input": {"prompt": "test"},
        "output": [f"https://cdn.example.com/{pid}.png"] if done else None,
        "error": None,
        "metrics": {"predict_time": 1.234} if done else {},
        "metadata": {"billing": {"credits_used": 0.03}} if done else {},
        "created_at": "2026-01-01T00:00:00.000000Z",
        "completed_at": "2026-01-01T00:00:02.000000Z" if done else None,
    }
    return json.dumps(prediction, separators=(",", ":")).encode()


class App:
    """The app behind the relay: records each relayed body once, checks every signature."""

    def __init__(self, secret: str) -> None:
        self._key = base64.b64decode(secret.removeprefix("whsec_"))
        self.arrived: dict[bytes, float] = {}  # body -> perf_counter at arrival
        self.waiters: dict[bytes, asyncio.Future[float]] = {}
        self.attempts = 0
        self.bad_signatures = 0

    def valid(self, headers: Any, body: bytes) -> bool:
        signed = f"{headers.get('webhook-id', '')}.{headers.get('webhook-timestamp', '')}.".encode() + body
        expected = "v1," + base64.b64encode(hmac.new(self._key, signed, hashlib.sha256).digest()).decode()
        return any(hmac.compare_digest(expected, s) for s in headers.get("webhook-signature", "").split())

    async def handle(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        now = time.perf_counter()
        self.attempts += 1
        if not self.valid(request.headers, body):
            self.bad_signatures += 1
            return web.Response(status=400)
        if body not in self.arrived:
            self.arrived[body] = now
            waiter = self.waiters.pop(body, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(now)
        return web.Response(status=204)

    async def start(self, port: int) -> web.ServerRunner:
        runner = web.ServerRunner(web.Server(self.handle), handle_signals=False, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        return runner

    async def drain(self, bodies: Sequence[bytes], timeout: float) -> float | None:
        """Seconds until the app holds every body in `bodies`, or None after `timeout`."""
        start = time.perf_counter()
        while any(body not in self.arrived for body in bodies):
            if time.perf_counter() - start > timeout:
                return None
            await asyncio.sleep(0.01)
        return time.perf_counter() - start


class Store:
    """The daemon's store, read (never written) for route ids and the events committed."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, timeout=30.0)

    def routes(self) -> list[str]:
        rows = self._db.execute("SELECT id FROM routes WHERE environment = ? ORDER BY id", (ENVIRONMENT,))
        return [row[0] for row in rows]

    def events(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM events").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def signed_headers(key: bytes, body: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Skytells-Signature": hmac.new(key, body, hashlib.sha256).hexdigest(),
    }


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # nearest rank
    return ordered[int(rank) - 1]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "p50": round(percentile(ms, 50), 3),
        "p99": round(percentile(ms, 99), 3),
        "max": round(max(ms), 3),
        "mean": round(statistics.fmean(ms), 3),
    }


# --- the commands ----------------------------------------------------------------------


async def make_routes(proxy: str, target_port: int, count: int) -> dict[str, Any]:
    target = f"http://127.0.0.1:{target_port}/hooks"
    failed = 0
    async with aiohttp.ClientSession() as session:
        for n in range(count):
            body = {**CREATE, "webhook": {"url": target, "events": ["started", "completed"]}}
            headers = {"X-User-Id": f"bench-user-{n % 100}"}
            async with session.post(f"{proxy}/v1/predictions", json=body, headers=headers) as answer:
                await answer.read()
                failed += answer.status != 201
    return {"routes": count, "failed": failed}


async def latency(receiver: str, store_path: Path, target_port: int, events: int) -> dict[str, Any]:
    key = os.environ[KEY_ENV].encode()
    app = App(os.environ[SECRET_ENV])
    runner = await app.start(target_port)
    store = Store(store_path)
    routes = store.routes()
    run = uuid.uuid4().hex[:12]
    answered: list[float] = []
    relayed: list[float] = []
    failed = 0
    try:
        async with aiohttp.ClientSession() as session:
            warmup = 20
            for i in range(warmup + events):
                body = prediction_body(run, i)
                url = f"{receiver}/hooks/{ENVIRONMENT}/{routes[(i // 2) % len(routes)]}"
                waiter = app.waiters[body] = asyncio.get_running_loop().create_future()
                sent = time.perf_counter()
                async with session.post(url, data=body, headers=signed_headers(key, body)) as answer:
                    await answer.read()
                    ok = answer.status == 200
                got_answer = time.perf_counter()
                if not ok:
                    failed += 1
                    app.waiters.pop(body, None)
                    continue
                arrived = await asyncio.wait_for(waiter, 30.0)
                if i >= warmup:
                    answered.append(got_answer - sent)
                    relayed.append(arrived - got_answer)
    finally:
        store.close()
        await runner.cleanup()
    return {
        "events": events,
        "failed": failed,
        "bad_signatures": app.bad_signatures,
        "receiver_ms": summary_ms(answered),
        "relay_ms": summary_ms(relayed),
        "end_to_end_ms": summary_ms([a + r for a, r in zip(answered, relayed, strict=True)]),
    }


async def throughput(
    receiver: str, store_path: Path, target_port: int, seconds: float, concurrency: int
) -> dict[str, Any]:
    key = os.environ[KEY_ENV].encode()
    app = App(os.environ[SECRET_ENV])
    runner = await app.start(target_port)
    store = Store(store_path)
    routes = store.routes()
    run = uuid.uuid4().hex[:12]
    next_index = 0
    accepted: list[bytes] = []
    refused: dict[str, int] = {}

    async def sender(session: aiohttp.ClientSession, until: float) -> None:
        nonlocal next_index
        while time.perf_counter() < until:
            i = next_index
            next_index += 1
            body = prediction_body(run, i)
            url = f"{receiver}/hooks/{ENVIRONMENT}/{routes[(i // 2) % len(routes)]}"
            try:
                async with session.post(url, data=body, headers=signed_headers(key, body)) as answer:
                    await answer.read()
                    status = str(answer.status)
            except aiohttp.ClientError as exc:
                status = type(exc).__name__
            if status == "200":
                accepted.append(body)
            else:
                refused[status] = refused.get(status, 0) + 1

    try:
        before = store.events()
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            start = time.perf_counter()
            await asyncio.gather(*(sender(session, start + seconds) for _ in range(concurrency)))
            elapsed = time.perf_counter() - start
        committed = store.events() - before
        relayed_by_end = sum(1 for body in accepted if body in app.arrived)
        drain = await app.drain(accepted, DRAIN_TIMEOUT)
        relayed = sum(1 for body in accepted if body in app.arrived)
    finally:
        store.close()
        await runner.cleanup()
    return {
        "seconds": round(elapsed, 3),
        "concurrency": concurrency,
        "accepted": len(accepted),
        "refused": refused,
        "committed": committed,
        "events_per_second": round(len(accepted) / elapsed, 1),
        "relayed_by_end": relayed_by_end,
        "relayed": relayed,
        "drain_seconds": None if drain is None else round(drain, 3),
        "relay_attempts": app.attempts,
        "bad_signatures": app.bad_signatures,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    routes = sub.add_parser("routes", help="create N predictions asking for webhooks")
    routes.add_argument("--proxy", required=True)
    routes.add_argument("--target-port", type=int, required=True)
    routes.add_argument("--count", type=int, default=100)
    for name, what in (("latency", "one callback at a time"), ("throughput", "C callbacks in flight")):
        cmd = sub.add_parser(name, help=what)
        cmd.add_argument("--receiver", required=True)
        cmd.add_argument("--store", type=Path, required=True)
        cmd.add_argument("--target-port", type=int, required=True)
        if name == "latency":
            cmd.add_argument("--events", type=int, default=500)
        else:
            cmd.add_argument("--seconds", type=float, default=5.0)
            cmd.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    if args.command == "routes":
        result = asyncio.run(make_routes(args.proxy, args.target_port, args.count))
    elif args.command == "latency":
        result = asyncio.run(latency(args.receiver, args.store, args.target_port, args.events))
    else:
        result = asyncio.run(
            throughput(args.receiver, args.store, args.target_port, args.seconds, args.concurrency)
        )
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
