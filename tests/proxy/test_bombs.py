"""A small coded body that decodes to a gigabyte never sits in a daemon's memory.

The upstream answers 401 with a 1 MB gzip body of 1 GiB of zeros. The proxy decodes an
error body to look for the key in it, so it must stop at its bound: a reading client
gets 502 upstream_too_large, and clients that never read cost no more than one that does.
"""

from __future__ import annotations

import asyncio
import re
import struct
import zlib

import aiohttp
from aiohttp import web
from helpers import CANARY, env_config, free_port, write_config
from helpers.daemon import eventually
from helpers.http import assert_error, host_of, http_head
from helpers.memory import RssSampler, rss_kib
from yarl import URL

GIB = 1 << 30
RSS_GROWTH_LIMIT_KIB = 64 * 1024


def gzip_bomb(size: int = GIB) -> bytes:
    """One gzip member of `size` zeros, about size/1000 bytes, built without deflating it all:
    after a full flush every MiB of zeros deflates to the same bytes."""
    block = bytes(1 << 20)
    coder = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS, 9, zlib.Z_RLE)
    coded = coder.compress(block) + coder.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(size >> 20):
        crc = zlib.crc32(block, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    trailer = struct.pack("<II", crc, size & 0xFFFFFFFF)
    return header + coded * (size >> 20) + coder.flush() + trailer


def bomb_app(bomb: bytes) -> web.Application:
    async def bombed(request: web.Request) -> web.Response:
        return web.Response(
            status=401, body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    app = web.Application()
    app.router.add_get("/v1/models", bombed)
    return app


async def test_a_gzip_bomb_error_keeps_memory_bounded_for_readers_and_non_readers(
    raw_upstream, run_daemon, tmp_path, canary_env
):
    bomb = await asyncio.to_thread(gzip_bomb)
    assert len(bomb) < 1_200_000
    upstream = await raw_upstream(bomb_app(bomb))
    port = free_port()
    path = write_config(
        tmp_path, env_config(upstream, listen=f"127.0.0.1:{port}", server='log_level = "warning"')
    )
    daemon = await asyncio.to_thread(run_daemon, path, port, {"SKYPROXY_TEST_KEY": CANARY})
    url = daemon.url
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(f"{url}/v1/health-warm-up") as r:  # warm the pools and imports
            await r.read()
        baseline = rss_kib(daemon.process.pid)
        with RssSampler(daemon.process.pid) as sampler:
            # Four clients that send a request and never read a byte of the answer...
            target = URL(url)
            idle = [await asyncio.open_connection(target.host, target.port) for _ in range(4)]
            for _, writer in idle:
                writer.write(http_head("GET", "/v1/models", [("Host", host_of(url))]))
            # ...and one that reads.
            async with session.get(f"{url}/v1/models") as r:
                answer = (r.status, r.headers, await r.read())
            assert_error(502, "upstream_too_large", answer)

            async def answered() -> bool:  # the four unread answers too, once each bound is met
                async with session.get(f"{url}/-/metrics") as r:
                    text = await r.text()
                return bool(re.search(r'skyproxy_requests_total\{[^}]*status="502"\} 5\.0', text))

            await eventually(answered, "five 502 answers", deadline_s=60)
            for _, writer in idle:
                writer.close()
    growth = sampler.peak - baseline
    assert growth < RSS_GROWTH_LIMIT_KIB, f"RSS grew {growth // 1024} MiB for a 1 GiB bomb"


async def test_a_gzip_bomb_success_streams_decoded_within_bounded_memory(
    raw_upstream, run_daemon, tmp_path, canary_env
):
    # A success answer streams decoded, as fast as each client takes it: one client reads
    # 20 MiB of it then stops, four never read; idle_timeout then ends all five.
    bomb = await asyncio.to_thread(gzip_bomb)

    async def bombed(request: web.Request) -> web.Response:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_get("/v1/files/bomb", bombed)
    upstream = await raw_upstream(app)
    port = free_port()
    server = 'log_level = "warning"\nidle_timeout = 1'
    path = write_config(tmp_path, env_config(upstream, listen=f"127.0.0.1:{port}", server=server))
    daemon = await asyncio.to_thread(run_daemon, path, port, {"SKYPROXY_TEST_KEY": CANARY})
    url = daemon.url
    target = URL(url)
    request = http_head("GET", "/v1/files/bomb", [("Host", host_of(url))])
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        baseline = rss_kib(daemon.process.pid)
        with RssSampler(daemon.process.pid) as sampler:
            clients = [await asyncio.open_connection(target.host, target.port) for _ in range(5)]
            for _, writer in clients:
                writer.write(request)
            reader = clients[0][0]
            taken = 0
            while taken < 20 << 20:
                chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
                assert chunk
                taken += len(chunk)

            async def all_over() -> bool:
                async with session.get(f"{url}/-/metrics") as r:
                    text = await r.text()
                found = re.findall(r'skyproxy_requests_total\{[^}]*route="other"[^}]*\} (\d+)\.0', text)
                return sum(map(int, found)) == 5

            await eventually(all_over, "five exchanges over", deadline_s=60)
            for _, writer in clients:
                writer.close()
    growth = sampler.peak - baseline
    assert growth < RSS_GROWTH_LIMIT_KIB, f"RSS grew {growth // 1024} MiB streaming a 1 GiB bomb"
