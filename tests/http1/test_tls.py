"""TLS to the upstream, through the real daemon: the system trust store, SNI and keep-alive."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from helpers import CANARY, env_config, free_port, write_config
from helpers.http import assert_error, fetch
from helpers.raw_upstream import TIMEOUT
from multidict import CIMultiDict

# -- TLS to the upstream, through the real daemon ----------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "upstream-cert.pem", tmp_path / "upstream-key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@dataclass
class TlsUpstream:
    port: int
    seen: list[tuple[CIMultiDict[str], object]]  # headers, and the peer the request came from


@pytest.fixture
async def tls_upstream(certificate: tuple[Path, Path]) -> AsyncIterator[TlsUpstream]:
    upstream = TlsUpstream(0, [])

    async def handle(request: web.Request) -> web.Response:
        upstream.seen.append((CIMultiDict(request.headers), request.transport.get_extra_info("peername")))
        return web.json_response({"tls": request.secure, "path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    upstream.port = runner.addresses[0][1]
    try:
        yield upstream
    finally:
        await runner.cleanup()


async def start_daemon(run_daemon, tmp_path: Path, upstream: str, env: dict[str, str]):  # type: ignore[no-untyped-def]
    port = free_port()
    path = write_config(tmp_path, env_config(upstream, listen=f"127.0.0.1:{port}"))
    return await asyncio.to_thread(run_daemon, path, port, {"SKYPROXY_TEST_KEY": CANARY, **env})


async def test_tls_upstream_end_to_end(certificate, tls_upstream, run_daemon, tmp_path):
    cert, _ = certificate
    daemon = await start_daemon(
        run_daemon, tmp_path, f"https://localhost:{tls_upstream.port}", {"SSL_CERT_FILE": str(cert)}
    )
    async with aiohttp.ClientSession() as session:
        for n in (1, 2):
            status, _, body = await asyncio.wait_for(
                fetch(session, "GET", f"{daemon.url}/v1/models/{n}"), TIMEOUT
            )
            assert status == 200, body
            assert json.loads(body) == {"tls": True, "path": f"/v1/models/{n}"}
    assert [headers["x-api-key"] for headers, _ in tls_upstream.seen] == [CANARY, CANARY]
    assert tls_upstream.seen[0][0]["Host"] == f"localhost:{tls_upstream.port}"
    peers = {peer for _, peer in tls_upstream.seen}
    assert len(peers) == 1  # the TLS connection was kept alive for the second request


async def test_untrusted_tls_upstream_is_a_502(certificate, tls_upstream, run_daemon, tmp_path):
    daemon = await start_daemon(run_daemon, tmp_path, f"https://localhost:{tls_upstream.port}", {})
    async with aiohttp.ClientSession() as session:
        answer = await asyncio.wait_for(fetch(session, "GET", f"{daemon.url}/v1/models"), TIMEOUT)
    assert_error(502, "upstream_unreachable", answer)
    assert tls_upstream.seen == []
