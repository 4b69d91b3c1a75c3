"""Upstreams for the benchmark: nginx config generation and two aiohttp servers.

* ``nginx_upstream_conf`` writes an nginx.conf answering ``POST /v1/predictions`` with a
  canned 201 prediction object and ``GET /v1/predictions/ID`` with a 200 "processing"
  one (401 when the ``x-api-key`` header is missing, so a proxy that forgets the key
  shows up as errors in wrk's output). Their ``urls`` name the upstream's own origin,
  as the real API's do, so a proxy that rewrites links has work to do.
* ``nginx_proxy_conf`` writes an nginx.conf that proxies to an upstream and only sets
  ``x-api-key``: the "what a C proxy costs" reference.
* ``fast`` is the same canned upstream in aiohttp, used when nginx is not installed.
* ``trickle`` answers ``POST /v1/chat/completions`` with a server-sent event stream that
  emits one event a second for N seconds, then ``data: [DONE]``. With ``--expect K`` the
  streams stay open until K are open at once, then N seconds more. ``GET /-/stats``
  returns the number of open streams and the peak, so the runner can see that K streams
  really were open at once.

Run the aiohttp servers with ``python -m bench.upstreams fast --port P`` or
``python -m bench.upstreams trickle --port P --seconds 30``; ``python -m bench.upstreams
nginx-conf --port P --dir D`` prints the path of a generated nginx.conf.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
import time
import uuid
from pathlib import Path

from aiohttp import web

MODEL = "truefusion-pro"
PREDICTION_PATHS = ("/v1/predictions", "/v1/predict")

# A realistic prediction object. nginx fills the id from $request_id (create) or the path
# (get), and the origin from the Host header the proxy sent.
_PREDICTION_TEMPLATE = {
    "id": "ID",
    "status": "STATUS",
    "model": MODEL,
    "version": "2025-01",
    "input": {"prompt": "test"},
    "output": None,
    "error": None,
    "logs": "",
    "metrics": {},
    "created_at": "2025-01-01T00:00:00.000000Z",
    "started_at": None,
    "completed_at": None,
    "urls": {
        "get": "ORIGIN/v1/predictions/ID",
        "cancel": "ORIGIN/v1/predictions/ID/cancel",
    },
}


def prediction_json(prediction_id: str, origin: str, status: str = "starting") -> str:
    """The canned prediction object, its links at ``origin`` (``http://host:port``)."""
    text = json.dumps(_PREDICTION_TEMPLATE, separators=(",", ":"))
    return text.replace("STATUS", status).replace("ORIGIN", origin).replace("ID", prediction_id)


def _nginx_common(workdir: Path, worker_connections: int) -> str:
    """The parts shared by both nginx configs: everything under ``workdir``, no root paths."""
    return f"""\
daemon off;
master_process on;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
worker_rlimit_nofile {worker_connections * 2 + 64};
events {{
    worker_connections {worker_connections};
    multi_accept on;
}}
"""


def _nginx_http_common(workdir: Path) -> str:
    return f"""\
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server_tokens off;
"""


def nginx_upstream_conf(workdir: Path, port: int, worker_connections: int = 4096) -> Path:
    """Write an nginx.conf for the fast canned upstream; returns its path."""
    workdir.mkdir(parents=True, exist_ok=True)
    # nginx needs '$request_id' left alone and the JSON quotes escaped for its string syntax.
    body = prediction_json("$prediction_id", "http://$http_host").replace('"', '\\"')
    polled = prediction_json("$polled_id", "http://$http_host", "processing").replace('"', '\\"')
    conf = (
        _nginx_common(workdir, worker_connections)
        + "http {\n"
        + _nginx_http_common(workdir)
        + f"""\
    default_type application/json;
    # $request_id is 32 random hex digits: shape it like a UUID.
    map $request_id $prediction_id {{
        "~^(?<a>.{{8}})(?<b>.{{4}})(?<c>.{{4}})(?<d>.{{4}})(?<e>.{{12}})$" "$a-$b-$c-$d-$e";
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /-/health {{
            return 200 "{{\\"status\\":\\"ok\\"}}";
        }}
        location ~ ^/v1/(predictions|predict)$ {{
            if ($request_method != POST) {{
                return 405 "{{\\"error\\":\\"method_not_allowed\\"}}";
            }}
            if ($http_x_api_key = "") {{
                return 401 "{{\\"error\\":\\"missing x-api-key\\"}}";
            }}
            return 201 "{body}";
        }}
        location ~ ^/v1/predictions/(?<polled_id>[A-Za-z0-9-]+)$ {{
            if ($request_method != GET) {{
                return 405 "{{\\"error\\":\\"method_not_allowed\\"}}";
            }}
            if ($http_x_api_key = "") {{
                return 401 "{{\\"error\\":\\"missing x-api-key\\"}}";
            }}
            return 200 "{polled}";
        }}
        location / {{
            return 404 "{{\\"error\\":\\"not_found\\"}}";
        }}
    }}
}}
"""
    )
    path = workdir / "nginx.conf"
    path.write_text(conf)
    return path


def nginx_proxy_conf(
    workdir: Path, port: int, upstream_port: int, key: str, worker_connections: int = 4096
) -> Path:
    """Write an nginx.conf proxying to 127.0.0.1:``upstream_port`` with ``x-api-key`` set."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = (
        _nginx_common(workdir, worker_connections)
        + "http {\n"
        + _nginx_http_common(workdir)
        + f"""\
    upstream skytells {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /-/health {{
            default_type application/json;
            return 200 "{{\\"status\\":\\"ok\\"}}";
        }}
        location / {{
            proxy_pass http://skytells;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header x-api-key "{key}";
            proxy_buffering off;
            proxy_request_buffering off;
            client_max_body_size 50m;
        }}
    }}
}}
"""
    )
    path = workdir / "nginx.conf"
    path.write_text(conf)
    return path


def nginx_command(conf: Path) -> list[str]:
    """The command line that runs nginx in the foreground with everything under conf's dir."""
    prefix = conf.parent
    return ["nginx", "-e", str(prefix / "error.log"), "-p", f"{prefix}/", "-c", str(conf)]


# --- aiohttp servers -------------------------------------------------------------------


def fast_app() -> web.Application:
    """The canned prediction upstream in aiohttp (fallback when nginx is missing)."""

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def predictions(request: web.Request) -> web.Response:
        await request.read()
        if not request.headers.get("x-api-key"):
            return web.json_response({"error": "missing x-api-key"}, status=401)
        body = prediction_json(str(uuid.uuid4()), f"http://{request.host}")
        return web.Response(status=201, text=body, content_type="application/json")

    async def prediction(request: web.Request) -> web.Response:
        if not request.headers.get("x-api-key"):
            return web.json_response({"error": "missing x-api-key"}, status=401)
        body = prediction_json(request.match_info["pid"], f"http://{request.host}", "processing")
        return web.Response(status=200, text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/-/health", health)
    for path in PREDICTION_PATHS:
        app.router.add_post(path, predictions)
    app.router.add_get("/v1/predictions/{pid}", prediction)
    return app


class TrickleStats:
    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.started = 0
        self.completed = 0
        self.aborted = 0
        self.missing_key = 0
        self.all_open_after: float | None = None  # seconds from the first stream


def trickle_app(
    seconds: float, interval: float = 1.0, expect: int = 0, max_seconds: float = 0.0
) -> web.Application:
    """An upstream whose chat completions stream one SSE event per ``interval`` seconds.

    Without ``expect``, each stream lasts ``seconds``. With ``expect=N``, every stream
    stays open until N streams have been open at once, then ``seconds`` more (so all N
    overlap however slowly the proxy accepts them). ``max_seconds`` is a deadline counted
    from the first stream: every stream ends by then, all N open or not.
    """
    stats = TrickleStats()
    all_open = asyncio.Event()
    first_start: list[float] = []

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def stats_view(_: web.Request) -> web.Response:
        return web.json_response(vars(stats))

    def finished(started: float, barrier: float) -> bool:
        now = time.monotonic()
        if max_seconds and now - first_start[0] >= max_seconds:
            return True
        if not expect:
            return now - started >= seconds
        return all_open.is_set() and now - barrier >= seconds

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        if not request.headers.get("x-api-key"):
            stats.missing_key += 1
            return web.json_response({"error": "missing x-api-key"}, status=401)
        resp = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        started = time.monotonic()
        if not first_start:
            first_start.append(started)
        stats.started += 1
        stats.active += 1
        stats.peak = max(stats.peak, stats.active)
        if expect and stats.active >= expect and not all_open.is_set():
            stats.all_open_after = round(started - first_start[0], 3)
            all_open.set()
        try:
            await resp.prepare(request)
            stream_id = uuid.uuid4().hex
            i = 0
            while True:
                chunk = {
                    "id": stream_id,
                    "object": "chat.completion.chunk",
                    "model": MODEL,
                    "choices": [{"index": 0, "delta": {"content": f"tok{i} "}}],
                }
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                i += 1
                await asyncio.sleep(interval)
                barrier = first_start[0] + (stats.all_open_after or 0.0)
                if finished(started, barrier):
                    break
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            stats.completed += 1
        except (ConnectionError, asyncio.CancelledError):
            stats.aborted += 1
            raise
        finally:
            stats.active -= 1
        return resp

    app = web.Application()
    app.router.add_get("/-/health", health)
    app.router.add_get("/-/stats", stats_view)
    app.router.add_post("/v1/chat/completions", completions)
    return app


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """uvloop when asked for (or "auto" and installed), else the default asyncio loop."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def serve(app: web.Application, host: str, port: int, backlog: int = 4096) -> None:
    """Serve ``app`` until SIGTERM or SIGINT."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=backlog)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstreams", description=__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    fast = sub.add_parser("fast", help="canned 201 prediction upstream (aiohttp)")
    fast.add_argument("--port", type=int, required=True)
    trickle = sub.add_parser("trickle", help="SSE upstream: one event a second")
    trickle.add_argument("--port", type=int, required=True)
    trickle.add_argument("--seconds", type=float, default=30.0)
    trickle.add_argument("--interval", type=float, default=1.0)
    trickle.add_argument("--expect", type=int, default=0, help="hold streams until N are open")
    trickle.add_argument(
        "--max-seconds", type=float, default=0.0, help="every stream ends this long after the first began"
    )
    conf = sub.add_parser("nginx-conf", help="write a canned-upstream nginx.conf, print its path")
    conf.add_argument("--port", type=int, required=True)
    conf.add_argument("--dir", type=Path, required=True)
    for p in (fast, trickle):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    args = parser.parse_args(argv)

    if args.kind == "nginx-conf":
        print(nginx_upstream_conf(args.dir.resolve(), args.port))
        return 0
    raise_nofile()
    app = (
        fast_app()
        if args.kind == "fast"
        else trickle_app(args.seconds, args.interval, args.expect, args.max_seconds)
    )
    loop = new_event_loop(args.loop)
    asyncio.set_event_loop(loop)
    started = time.monotonic()
    try:
        loop.run_until_complete(serve(app, args.host, args.port))
    finally:
        loop.close()
    print(f"{args.kind} upstream stopped after {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
