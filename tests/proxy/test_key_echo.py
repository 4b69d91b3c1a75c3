"""Whatever the upstream sends, the key never reaches a client.

Each upstream here echoes the key it received in another place or coding. Every answer
the client gets is scanned for the canary, and most tests also check what the client
does get: the mask, the status, or a 502 with a stable code.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import Callable

import brotli
import pytest
from aiohttp import web
from helpers import CANARY, assert_no_canary, env_config
from helpers.http import assert_error, fetch, host_of, http_head, raw_request
from helpers.raw_upstream import TIMEOUT, Peer
from yarl import URL

from skyproxy.keys.secret import fingerprint
from skyproxy.proxy.scrub import mask_of

USER = {"X-User-Id": "alice"}
MASK = mask_of(CANARY, fingerprint(CANARY))


def echo_everything_app(seen: list[str]) -> web.Application:
    """Answers any method on any path with the request it received, key and all."""

    async def echo(request: web.Request) -> web.Response:
        seen.append(request.method)
        return web.Response(text=f"{request.method} {request.path_qs} {dict(request.headers)}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@pytest.mark.parametrize(("method", "target"), [("TRACE", "/v1/models"), ("CONNECT", "/v1/models")])
async def test_trace_and_connect_are_refused_and_never_forwarded(
    method, target, raw_upstream, start_proxy, canary_env
):
    seen: list[str] = []
    proxy = await start_proxy(env_config(await raw_upstream(echo_everything_app(seen))))
    answer = await raw_request(proxy.url, http_head(method, target, [("Host", host_of(proxy.url))]))
    assert_error(501, "method_not_supported", answer)
    assert_no_canary(answer.body.decode("latin-1"), str(answer.headers))
    answer = await raw_request(proxy.url, http_head("GET", "/v1/models", [("Host", host_of(proxy.url))]))
    assert answer.status == 200
    assert seen == ["GET"]


# -- error bodies in every coding --------------------------------------------------------------


def raw_deflate(data: bytes) -> bytes:
    coder = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return coder.compress(data) + coder.flush()


CODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
}


def encode(data: bytes, header: str, raw: bool = False) -> bytes:
    for name in header.split(","):
        name = name.strip().lower()
        data = raw_deflate(data) if raw and name == "deflate" else CODERS[name](data)
    return data


def echo_app(
    status: int, coding: str, *, raw: bool = False, pieces: int = 1, reason: str = ""
) -> web.Application:
    """Answers `status` with a JSON body echoing the key, coded as `coding` says, in `pieces` writes."""

    async def echo(request: web.Request) -> web.StreamResponse:
        key = request.headers["x-api-key"]
        data = json.dumps({"error": {"message": f"key {key} is not valid; {key}{key[:-1]}{key}"}}).encode()
        headers = {"Content-Type": "application/json"}
        if coding:
            data = encode(data, coding, raw)
            headers["Content-Encoding"] = coding
        response = web.StreamResponse(
            status=status, headers=headers, reason=reason.replace("KEY", key) or None
        )
        response.content_length = len(data)
        await response.prepare(request)
        size = -(-len(data) // pieces)
        for i in range(0, len(data), size):
            await response.write(data[i : i + size])
            if pieces > 1:
                await asyncio.sleep(0.02)  # separate reads at the proxy
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/v1/{tail:.*}", echo)
    return app


def expected_message() -> str:
    return f"key {MASK} is not valid; {MASK}{CANARY[:-1]}{MASK}"


@pytest.mark.parametrize(
    ("coding", "raw", "pieces"),
    [
        ("br", False, 1),
        ("Br", False, 4),
        ("GZIP", False, 1),
        ("gzip, gzip", False, 3),
        ("deflate, br", False, 1),
        ("deflate", True, 1),  # raw deflate, no zlib header
        ("deflate", True, 5),
        ("Deflate", False, 2),
        ("x-gzip", False, 1),
        ("", False, 7),  # identity, the key split across reads
    ],
)
async def test_an_error_body_in_any_coding_reaches_the_client_masked(
    coding, raw, pieces, raw_upstream, start_proxy, canary_env
):
    proxy = await start_proxy(env_config(await raw_upstream(echo_app(401, coding, raw=raw, pieces=pieces))))
    status, headers, body = await fetch(
        proxy.session,
        "POST",
        f"{proxy.url}/v1/predictions",
        json={},
        headers={**USER, "Accept-Encoding": "br"},
    )
    assert status == 401
    assert_no_canary(body.decode("latin-1"), str(headers))
    assert "Content-Encoding" not in headers  # relayed decoded
    assert json.loads(body)["error"]["message"] == expected_message()


@pytest.mark.parametrize(
    ("coding", "body"),
    [
        ("gzip", b"plain text called gzip: KEY"),  # mislabelled
        ("br", b"plain text called br: KEY"),
        ("deflate", b"KEY"),
        ("gzip", "truncated"),
        ("zstd", b"a coding we cannot read: KEY"),
        ("compress", b"KEY"),
        ("gzip, zstd", b"KEY"),
    ],
)
async def test_an_error_body_that_cannot_be_inspected_is_502(
    coding, body, caplog, raw_upstream, start_proxy, canary_env
):
    async def answer(request: web.Request) -> web.Response:
        key = request.headers["x-api-key"].encode()
        data = gzip.compress(b"cut short " + key)[:-12] if body == "truncated" else body.replace(b"KEY", key)
        return web.Response(status=401, body=data, headers={"Content-Encoding": coding})

    app = web.Application()
    app.router.add_get("/v1/models", answer)
    proxy = await start_proxy(env_config(await raw_upstream(app)))
    status, headers, got = await fetch(proxy.session, "GET", f"{proxy.url}/v1/models")
    assert_error(502, "upstream_undecodable", (status, headers, got))
    assert_no_canary(got.decode("latin-1"), str(headers))
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_a_coded_success_body_is_decoded_and_masked(raw_upstream, start_proxy, canary_env):
    # The proxy asks for identity; an upstream that codes anyway is decoded, not trusted.
    proxy = await start_proxy(env_config(await raw_upstream(echo_app(200, "gzip", pieces=3))))
    status, headers, body = await fetch(proxy.session, "GET", f"{proxy.url}/v1/models")
    assert status == 200
    assert "Content-Encoding" not in headers
    assert json.loads(body)["error"]["message"] == expected_message()


# -- the head: reason phrase, header names and values -------------------------------------------


@pytest.mark.parametrize("status", [401, 200])
async def test_the_key_in_the_status_line_and_header_names_never_reaches_the_client(
    status, raw_upstream, start_proxy, canary_env
):
    async def answer(request: web.Request) -> web.Response:
        key = request.headers["x-api-key"]
        headers = {key: "named by the key", f"X-{key}-Suffix": "1", "X-Value": f"v={key}", "X-Kept": "yes"}
        return web.Response(status=status, reason=f"Denied {key}", text="{}", headers=headers)

    app = web.Application()
    app.router.add_get("/v1/models", answer)
    proxy = await start_proxy(env_config(await raw_upstream(app)))
    answer = await raw_request(proxy.url, http_head("GET", "/v1/models", [("Host", host_of(proxy.url))]))
    async with proxy.session.get(f"{proxy.url}/v1/models") as r:
        reason = r.reason
    assert answer.status == status
    assert_no_canary(str(answer.headers), answer.body.decode("latin-1"), str(reason))
    assert answer.headers["X-Kept"] == "yes"
    assert answer.headers["X-Value"] == f"v={MASK}"
    assert reason == f"Denied {MASK}"


# -- success bodies, small, large and streamed ------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 302])
async def test_a_small_success_or_redirect_body_is_masked(status, raw_upstream, start_proxy, canary_env):
    proxy = await start_proxy(env_config(await raw_upstream(echo_app(status, ""))))
    async with proxy.session.get(f"{proxy.url}/v1/models", allow_redirects=False) as r:
        body = await r.read()
        assert r.status == status
        assert int(r.headers["Content-Length"]) == len(body)
    assert json.loads(body)["error"]["message"] == expected_message()


async def test_a_large_body_keeps_its_length_with_the_key_split_across_reads(
    raw_upstream, start_proxy, canary_env
):
    filler = b"x" * 100_000

    async def download(request: web.Request) -> web.StreamResponse:
        key = request.headers["x-api-key"].encode()
        data = filler + key + filler + key[:-1] + b"|" + key
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(data)
        await response.prepare(request)
        cut = len(filler) + 7
        for piece in (data[:cut], data[cut : cut + 200_000 - 7], data[cut + 200_000 - 7 :]):
            await response.write(piece)
            await asyncio.sleep(0.05)  # separate reads at the proxy: the key is split
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/files/big", download)
    proxy = await start_proxy(env_config(await raw_upstream(app)))
    async with proxy.session.get(f"{proxy.url}/v1/files/big") as r:
        body = await r.read()
        assert r.status == 200
        assert r.headers["Content-Length"] == str(len(body))
    mask = MASK.encode()
    assert body == filler + mask + filler + CANARY.encode()[:-1] + b"|" + mask


async def test_an_event_stream_echoing_the_key_in_pieces_is_masked(raw_upstream, start_proxy, canary_env):
    async def stream(request: web.Request) -> web.StreamResponse:
        key = request.headers["x-api-key"].encode()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in (b'data: {"echo": "' + key[:5], key[5:20], key[20:] + b'"}\n\n', b"data: [DONE]\n\n"):
            await response.write(piece)
            await asyncio.sleep(0.05)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    proxy = await start_proxy(env_config(await raw_upstream(app)))
    status, _, body = await fetch(
        proxy.session, "POST", f"{proxy.url}/v1/chat/completions", json={}, headers=USER
    )
    assert status == 200
    assert body == f'data: {{"echo": "{MASK}"}}\n\ndata: [DONE]\n\n'.encode()


# -- byte-level answers: trailers, and a head line named by the key ------------------------------


async def read_all(url: str, request: bytes) -> bytes:
    target = URL(url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()


@pytest.mark.parametrize("status", [b"200 OK", b"401 Unauthorized"])
async def test_the_key_in_a_trailer_or_a_raw_head_line_never_reaches_the_client(
    status, raw_server, start_proxy, canary_env
):
    async def chunked(peer: Peer) -> None:
        while (seen := await peer.request()) is not None:
            key = seen.headers["x-api-key"].encode()
            await peer.send(
                b"HTTP/1.1 %s\r\n%s: named\r\nX-%s: also named\r\nTransfer-Encoding: chunked\r\n"
                b"Trailer: X-Echo\r\n\r\n5\r\nhello\r\n0\r\nX-Echo: %s\r\n%s: t\r\n\r\n"
                % (status, key, key, key, key)
            )

    upstream = await raw_server(chunked)
    proxy = await start_proxy(env_config(upstream.url))
    request = http_head("GET", "/v1/models", [("Host", host_of(proxy.url)), ("Connection", "close")])
    data = await read_all(proxy.url, request)
    assert data.startswith(b"HTTP/1.1 " + status)
    assert b"hello" in data
    assert_no_canary(data.decode("latin-1"))


async def test_the_benchmark_switch_leaves_success_bodies_unsearched_and_errors_not(
    raw_upstream, start_proxy, canary_env
):
    # scan_success_bodies = false exists only to price the search in the bench: this pins
    # what it turns off (2xx bodies), and what it never does (heads, error bodies).
    async def echo(request: web.Request) -> web.Response:
        key = request.headers["x-api-key"]
        status = int(request.query["status"])
        return web.Response(status=status, text=f"echo {key}", headers={"X-Echo": key})

    app = web.Application()
    app.router.add_get("/v1/models", echo)
    proxy = await start_proxy(env_config(await raw_upstream(app), server="scan_success_bodies = false"))
    _, headers, body = await fetch(proxy.session, "GET", f"{proxy.url}/v1/models?status=200")
    assert body == f"echo {CANARY}".encode()  # unsearched, as asked
    assert headers["X-Echo"] == MASK
    _, headers, body = await fetch(proxy.session, "GET", f"{proxy.url}/v1/models?status=400")
    assert body == f"echo {MASK}".encode()
