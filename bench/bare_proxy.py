"""The bare reference: the minimal honest aiohttp reverse proxy.

It does only what any aiohttp proxy must do: one pooled ``ClientSession`` (no connection
limit, no decompression), hop-by-hop headers dropped, the ``x-api-key`` header injected,
the request body streamed to the upstream and the response body streamed back chunk by
chunk. It listens with aiohttp's default backlog (128). No guard, no rate limit, no
audit, no metrics, no access log. It runs on the same event loop skyproxy picks by
default ("auto": uvloop when installed), so the ratio skyproxy/bare measures skyproxy's
features, not the loop.

    python -m bench.bare_proxy --listen 127.0.0.1:8801 --upstream http://127.0.0.1:8800 \\
        --key-env SKYPROXY_BENCH_KEY

``GET /-/health`` answers locally (the runner waits on it, as it does for skyproxy).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from bench.upstreams import new_event_loop, raise_nofile, serve

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)

SESSION = web.AppKey("session", aiohttp.ClientSession)


def make_app(upstream: str, key: str) -> web.Application:
    upstream = upstream.rstrip("/")

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP
        )
        headers["x-api-key"] = key
        data = request.content if request.body_exists else None
        async with request.app[SESSION].request(
            request.method,
            upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=data,
            allow_redirects=False,
        ) as upstream_resp:
            resp = web.StreamResponse(status=upstream_resp.status, reason=upstream_resp.reason)
            for k, v in upstream_resp.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    resp.headers.add(k, v)
            try:
                await resp.prepare(request)
                async for chunk in upstream_resp.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
            except ConnectionResetError:
                pass  # the client went away (wrk closing its connections at the end)
            return resp

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            app[SESSION] = session
            yield

    app = web.Application(client_max_size=52_428_800)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/-/health", health)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_proxy", description=__doc__)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8800")
    parser.add_argument("--key-env", default="SKYPROXY_BENCH_KEY", help="variable holding the key")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    key = os.environ.get(args.key_env, "")
    if not key:
        parser.error(f"${args.key_env} is empty")
    raise_nofile()
    loop = new_event_loop(args.loop)
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve(make_app(args.upstream, key), host, int(port), backlog=128))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
