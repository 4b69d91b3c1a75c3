"""Forwarding through a real proxy to real upstreams: the key, headers, bodies, streams, errors.

Every upstream is a real server on an ephemeral port: the embedded mock, or a raw aiohttp
app when a test needs odd behaviour. Requests whose exact bytes matter go over a raw socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import re
import zlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from helpers import CANARY, assert_no_canary, env_config, free_port, write_config
from helpers.http import (
    SANE_ID,
    RawResponse,
    assert_error,
    fetch,
    host_of,
    http_head,
    raw_request,
    read_response,
)
from helpers.memory import RssSampler, rss_kib
from multidict import CIMultiDict
from yarl import URL

from skyproxy.keys.secret import fingerprint
from skyproxy.proxy.scrub import mask_of

FINGERPRINT = fingerprint(CANARY)
MASK = mask_of(CANARY, FINGERPRINT)
USER = {"X-User-Id": "alice"}
MIB = 1024 * 1024


class Recorder:
    """A raw upstream that records exactly what arrived and answers 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, list[tuple[bytes, bytes]], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.method, request.raw_path, list(request.raw_headers), body))
        return web.json_response({"ok": True})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * MIB)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


# -- the key goes on, the client's credentials and hop-by-hop headers do not ------------------


async def test_mock_sees_the_environment_key_not_the_clients(mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url))
    status, _, body = await fetch(
        proxy.session,
        "POST",
        f"{proxy.url}/v1/predictions",
        json={"model": "truefusion-pro", "input": {"prompt": "a fox"}},
        headers={**USER, "X-API-KEY": "sk-client-own", "authorization": "Bearer sk-client-own"},
    )
    assert status == 201, body  # the mock answers 401 to any other key
    seen = {k.lower(): v for k, v in state.seen[-1].headers.items()}
    assert seen["x-api-key"] == CANARY
    assert "authorization" not in seen


async def test_client_credentials_and_hop_by_hop_headers_are_stripped(raw_upstream, start_proxy, canary_env):
    recorder = Recorder()
    upstream = await raw_upstream(recorder.app())
    proxy = await start_proxy(env_config(upstream))
    sent = [
        ("Host", host_of(proxy.url)),
        ("X-API-KEY", "sk-client-upper"),
        ("x-api-key", "sk-client-lower"),
        ("AUTHORIZATION", "Bearer sk-client-bearer"),
        ("cookie", "session=sk-client-cookie"),
        ("Proxy-Authorization", "Basic c2stY2xpZW50LXByb3h5"),
        ("PROXY-CONNECTION", "keep-alive"),
        ("tE", "trailers"),
        ("Keep-ALIVE", "timeout=5"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"),
        ("CONNECTION", "keep-alive, X-Hop-Custom,x-OTHER-hop"),
        ("x-hop-custom", "hop-value-1"),
        ("X-Other-Hop", "hop-value-2"),
        ("x-USER-id", "alice-user"),
        ("X-Kept", "kept-value"),
        ("Content-Type", "application/json"),
        ("Content-Length", "2"),
    ]
    answer = await raw_request(proxy.url, http_head("POST", "/v1/models", sent) + b"{}")
    assert answer.status == 200, answer.body
    [(method, path, headers, body)] = recorder.requests
    assert (method, path, body) == ("POST", "/v1/models", b"{}")
    forwarded = [(k.decode().lower(), v.decode()) for k, v in headers]
    names = {k for k, _ in forwarded}
    assert [v for k, v in forwarded if k == "x-api-key"] == [CANARY]
    for dropped in (
        "authorization",
        "cookie",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "keep-alive",
        "trailer",
        "upgrade",
        "x-hop-custom",
        "x-other-hop",
        "x-user-id",
    ):
        assert dropped not in names, dropped
    values = " ".join(v for _, v in forwarded)
    for marker in ("sk-client", "hop-value", "alice-user", "trailers", "timeout=5", "X-Checksum", "h2c"):
        assert marker not in values, marker
    assert "hop" not in dict(forwarded).get("connection", "").lower()
    assert dict(forwarded)["x-kept"] == "kept-value"
    assert dict(forwarded)["content-type"] == "application/json"
    assert dict(forwarded)["host"] == host_of(upstream)


async def test_configured_user_header_is_not_forwarded(raw_upstream, start_proxy, canary_env):
    recorder = Recorder()
    rules = '[rate_limit]\nuser_header = "X-Team-Member"\n'
    proxy = await start_proxy(env_config(await raw_upstream(recorder.app()), rules=rules))
    status, _, _ = await fetch(
        proxy.session,
        "GET",
        f"{proxy.url}/v1/models",
        headers={"x-team-MEMBER": "bob", "X-User-Id": "not-the-user-header"},
    )
    assert status == 200
    forwarded = {k.decode().lower(): v.decode() for k, v in recorder.requests[0][2]}
    assert "x-team-member" not in forwarded
    assert forwarded["x-user-id"] == "not-the-user-header"


# -- method, path, query and body pass through unchanged ---------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
async def test_method_query_and_body_pass_through(method, mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url))
    query = "b=2&a=1&a=3&q=%2F%20x%3D%26&empty=&flag&u=%E2%9C%93"
    body = os.urandom(300_000)
    direct = await fetch(
        proxy.session,
        method,
        URL(f"{url}/v1/echo?{query}", encoded=True),
        data=body,
        headers={"x-api-key": CANARY},
    )
    direct_seen = state.seen[-1].path
    proxied = await fetch(proxy.session, method, URL(f"{proxy.url}/v1/echo?{query}", encoded=True), data=body)
    assert proxied[0] == direct[0] == 200
    echo = json.loads(proxied[2])
    assert echo == json.loads(direct[2])
    assert echo["method"] == method
    assert echo["path"] == "/v1/echo"
    assert echo["size"] == len(body)
    assert echo["sha256"] == hashlib.sha256(body).hexdigest()
    assert state.seen[-1].path == direct_seen


async def test_raw_path_and_query_reach_upstream_byte_for_byte(raw_upstream, start_proxy, canary_env):
    recorder = Recorder()
    proxy = await start_proxy(env_config(await raw_upstream(recorder.app())))
    target = "/v1/models/some%2Fslug/x%20y;p=1?per_page=2&q=%2F%3F%23&q=2&z"
    answer = await raw_request(
        proxy.url, http_head("GET", target, [("Host", host_of(proxy.url)), ("Connection", "close")])
    )
    assert answer.status == 200
    assert recorder.requests[0][:2] == ("GET", target)


async def test_chunked_body_without_length_passes_through(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    block = os.urandom(65_536)
    digest = hashlib.sha256()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(40):
            piece = block[i:] + block[:i]
            digest.update(piece)
            yield piece

    status, _, body = await fetch(proxy.session, "POST", f"{proxy.url}/v1/echo", data=chunks())
    assert status == 200, body
    echo = json.loads(body)
    assert echo["size"] == 40 * len(block)
    assert echo["sha256"] == digest.hexdigest()


async def test_upstream_status_headers_and_body_come_back(raw_upstream, start_proxy, canary_env):
    async def accepted(request: web.Request) -> web.Response:
        return web.Response(
            status=202,
            body=b"\x00\x01binary\xff",
            headers={"Content-Type": "application/octet-stream", "X-Skytells-Ratelimit-Remaining": "7"},
        )

    app = web.Application()
    app.router.add_get("/v1/thing", accepted)
    proxy = await start_proxy(env_config(await raw_upstream(app)))
    status, headers, body = await fetch(proxy.session, "GET", f"{proxy.url}/v1/thing")
    assert status == 202
    assert body == b"\x00\x01binary\xff"
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["X-Skytells-Ratelimit-Remaining"] == "7"


# -- only /v1/ is forwarded ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/v1",
        "/v2/predictions",
        "/V1/models",
        "/favicon.ico",
        "/-/unknown",
        "//v1/models",
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1/./models",
        "/v1/a/..%2f..%2fadmin",
        "http://evil.example/v1/models",
    ],
)
async def test_only_v1_paths_are_forwarded(target, mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url))
    answer = await raw_request(
        proxy.url, http_head("GET", target, [("Host", host_of(proxy.url)), ("Connection", "close")])
    )
    assert_error(404, "not_found", answer)
    assert not state.seen


async def test_a_v1_path_is_forwarded(mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url))
    status, headers, body = await fetch(proxy.session, "GET", f"{proxy.url}/v1/models")
    assert status == 200
    assert SANE_ID.fullmatch(headers["X-Request-Id"])
    assert json.loads(body)["data"]
    assert [s.path for s in state.seen] == ["/v1/models"]


# -- X-Request-Id on every proxied response -----------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/models", "/nope"])
async def test_sane_request_id_is_echoed(path, mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url))
    given = "req-2024.11:abc_DEF-9"
    status, headers, _ = await fetch(
        proxy.session, "GET", f"{proxy.url}{path}", headers={"X-Request-Id": given}
    )
    assert status in (200, 404)
    assert headers.getall("X-Request-Id") == [given]
    if status == 200:
        assert CIMultiDict(state.seen[-1].headers).get("X-Request-Id") == given


@pytest.mark.parametrize(
    "given", ["x" * 129, "has space", "semi;colon", "<script>", "ünïcode", "a,b", 'quote"d']
)
async def test_insane_request_id_is_replaced(given, mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url))
    head = [("Host", host_of(proxy.url)), ("X-Request-Id", given), ("Connection", "close")]
    answer = await raw_request(proxy.url, http_head("GET", "/v1/models", head))
    assert answer.status == 200
    replaced = answer.headers.getall("X-Request-Id")
    assert len(replaced) == 1 and replaced[0] != given
    assert SANE_ID.fullmatch(replaced[0])
    assert CIMultiDict(state.seen[-1].headers)["X-Request-Id"] == replaced[0]
    missing = await raw_request(proxy.url, http_head("GET", "/nope", head))
    assert assert_error(404, "not_found", missing) != given


async def test_upstream_request_id_is_replaced_by_ours(raw_upstream, start_proxy, canary_env):
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({}, headers={"X-Request-Id": "upstream-own-id"})

    app = web.Application()
    app.router.add_get("/v1/models", handler)
    proxy = await start_proxy(env_config(await raw_upstream(app)))
    _, headers, _ = await fetch(
        proxy.session, "GET", f"{proxy.url}/v1/models", headers={"X-Request-Id": "mine"}
    )
    assert headers.getall("X-Request-Id") == ["mine"]


# -- streaming: SSE event by event ------------------------------------------------------------


async def test_sse_events_reach_the_client_one_by_one(raw_upstream, start_proxy, canary_env):
    client_saw_first = asyncio.Event()
    sent: list[int] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in (1, 2, 3):
            if n == 2:
                # A proxy that buffers never lets the client see event 1, so this times out.
                await asyncio.wait_for(client_saw_first.wait(), 10)
            await response.write(f'data: {{"n": {n}}}\n\n'.encode())
            sent.append(n)
            await asyncio.sleep(0.3)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    proxy = await start_proxy(env_config(await raw_upstream(app)))
    async with proxy.session.post(
        f"{proxy.url}/v1/chat/completions", json={"model": "m", "stream": True}, headers=USER
    ) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        assert first == b'data: {"n": 1}\n\n'
        assert sent == [1]  # event 1 arrived while the upstream still held back the rest
        client_saw_first.set()
        rest = await r.content.read()
    assert rest == b'data: {"n": 2}\n\ndata: {"n": 3}\n\n'
    assert sent == [1, 2, 3]


async def test_mock_chat_stream_ends_with_done(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    request = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    status, headers, body = await fetch(
        proxy.session, "POST", f"{proxy.url}/v1/chat/completions", json=request, headers=USER
    )
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    events = body.decode().split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "Hello from the skyproxy mock."


# -- 413, 502, 504 ----------------------------------------------------------------------------


async def test_body_too_large_by_content_length(mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url, server="max_body_bytes = 1024"))
    # Only the head is sent: the proxy must answer from Content-Length without reading a body.
    head = [("Host", host_of(proxy.url)), ("Content-Length", "5000"), ("Content-Type", "text/plain")]
    answer = await raw_request(proxy.url, http_head("POST", "/v1/echo", head))
    assert_error(413, "body_too_large", answer)
    status, headers, body = await fetch(proxy.session, "POST", f"{proxy.url}/v1/echo", data=b"x" * 1025)
    assert_error(413, "body_too_large", (status, headers, body))
    assert not state.seen
    ok = await fetch(proxy.session, "POST", f"{proxy.url}/v1/echo", data=b"x" * 1024)
    assert ok[0] == 200 and json.loads(ok[2])["size"] == 1024


async def test_a_413_closes_the_connection_its_unread_body_is_on(mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url, server="max_body_bytes = 1024"))
    target = URL(proxy.url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        head = [("Host", host_of(proxy.url)), ("Content-Length", "5000"), ("Content-Type", "text/plain")]
        writer.write(http_head("POST", "/v1/echo", head))
        await writer.drain()
        answer = await asyncio.wait_for(read_response(reader), 10)
        assert_error(413, "body_too_large", answer)
        assert answer.headers["Connection"].lower() == "close"
        # The body comes late, and holds a request of its own: it must get no answer.
        smuggled = http_head("GET", "/v1/models", [("Host", host_of(proxy.url))])
        writer.write(smuggled + b"x" * (5000 - len(smuggled)) + smuggled)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert not state.seen


async def test_a_reload_routes_the_next_request_by_the_new_generation(
    raw_upstream, start_proxy, canary_env, monkeypatch
):
    # The route upstream (origin, key, body limit, timeout) is built once per generation:
    # the first request after a reload must see every one of the new values.
    first, second = Recorder(), Recorder()
    first_url, second_url = await raw_upstream(first.app()), await raw_upstream(second.app())
    proxy = await start_proxy(env_config(first_url, server="max_body_bytes = 1024"))
    answer = await fetch(proxy.session, "POST", f"{proxy.url}/v1/echo", data=b"x" * 2000)
    assert_error(413, "body_too_large", answer)
    assert (await fetch(proxy.session, "POST", f"{proxy.url}/v1/echo", data=b"x" * 1000))[0] == 200

    monkeypatch.setenv("SKYPROXY_OTHER_KEY", "sk-other-" + "k" * 24)
    other = env_config(second_url, key='key = "env:SKYPROXY_OTHER_KEY"', server="max_body_bytes = 4096")
    proxy.state.runtime.settings.path.write_text(other)
    assert await proxy.state.reload() is None
    assert (await fetch(proxy.session, "POST", f"{proxy.url}/v1/echo", data=b"x" * 2000))[0] == 200
    assert len(first.requests) == 1 and len(second.requests) == 1
    headers = dict((name.lower(), value) for name, value in second.requests[0][2])
    assert headers[b"x-api-key"] == b"sk-other-" + b"k" * 24
    assert second.requests[0][3] == b"x" * 2000


async def _expecting(proxy_url: str, extra: list[tuple[str, str]], body: bytes) -> tuple[bytes, RawResponse]:
    """Sends a head with `Expect: 100-continue`, waits for the interim answer, then the body.

    Returns what came before the body was sent, and the final response."""
    target = URL(proxy_url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        head = [
            ("Host", host_of(proxy_url)),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Expect", "100-continue"),
            *extra,
        ]
        writer.write(http_head("POST", "/v1/predictions", head))
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if interim.startswith(b"HTTP/1.1 100 "):
            writer.write(body)
            await writer.drain()
            final = await asyncio.wait_for(read_response(reader), 10)
        else:  # a final answer instead: the body must not be needed
            status = int(interim.split()[1])
            rest = await asyncio.wait_for(reader.read(65536), 5)
            final = RawResponse(status, CIMultiDict(), rest)
            interim = b""
        return interim, final
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_expect_100_continue_is_answered_then_the_body_forwarded(
    mock_upstream, start_proxy, canary_env
):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url))
    body = json.dumps({"model": "truefusion-pro", "input": {"prompt": "x" * 4000}}).encode()
    interim, final = await _expecting(proxy.url, [("X-User-Id", "alice")], body)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.status == 201, final.body
    assert [s.path for s in state.seen] == ["/v1/predictions"]
    assert "Expect" not in state.seen[0].headers  # answered here, never sent on


async def test_a_refused_request_gets_its_answer_instead_of_100_continue(
    mock_upstream, start_proxy, canary_env
):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url, server="max_body_bytes = 1024"))
    interim, final = await _expecting(proxy.url, [("X-User-Id", "alice")], b"x" * 5000)
    assert interim == b""
    assert final.status == 413
    assert not state.seen


async def test_an_unknown_expectation_is_417(mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url))
    head = [("Host", host_of(proxy.url)), ("X-User-Id", "alice"), ("Expect", "tea"), ("Content-Length", "2")]
    answer = await raw_request(proxy.url, http_head("POST", "/v1/predictions", head) + b"{}")
    assert_error(417, "expectation_failed", answer)
    assert not state.seen


class CountingSink:
    """An upstream that counts the bytes of an upload, and tells when the first arrived."""

    def __init__(self) -> None:
        self.received = 0
        self.complete = False
        self.first_bytes = asyncio.Event()
        self.finished = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        try:
            async for chunk in request.content.iter_any():
                self.received += len(chunk)
                self.first_bytes.set()
            self.complete = True
        except (ConnectionError, aiohttp.ClientPayloadError):
            pass  # the proxy cut the upload: what we want
        finally:
            self.finished.set()
        return web.Response(text="stored")

    async def start(self, raw_upstream, start_proxy, limit: int):  # type: ignore[no-untyped-def]
        app = web.Application(client_max_size=MIB)
        app.router.add_post("/v1/upload", self.handle)
        return await start_proxy(env_config(await raw_upstream(app), server=f"max_body_bytes = {limit}"))

    async def assert_cut(self, limit: int) -> None:
        await asyncio.wait_for(self.finished.wait(), 10)
        assert not self.complete
        assert self.received <= limit


CHUNK_LIMIT = 65_536
PIECE = b"z" * 16_384


async def test_chunked_body_too_large_is_refused_when_the_limit_is_crossed(
    raw_upstream, start_proxy, canary_env
):
    sink = CountingSink()
    proxy = await sink.start(raw_upstream, start_proxy, CHUNK_LIMIT)
    chunk = f"{len(PIECE):x}\r\n".encode() + PIECE + b"\r\n"
    target = URL(proxy.url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        head = [("Host", host_of(proxy.url)), ("Transfer-Encoding", "chunked")]
        writer.write(http_head("POST", "/v1/upload", head) + chunk)
        await asyncio.wait_for(sink.first_bytes.wait(), 10)  # the upload streams on as it comes
        # Past the limit, and no terminating chunk: the body never ends, so only a proxy
        # that counts as it streams can answer.
        writer.write(chunk * (CHUNK_LIMIT // len(PIECE)))
        await writer.drain()
        answer = await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert_error(413, "body_too_large", answer)
    await sink.assert_cut(CHUNK_LIMIT)


async def test_whole_chunked_body_over_limit_never_reaches_upstream(raw_upstream, start_proxy, canary_env):
    sink = CountingSink()
    proxy = await sink.start(raw_upstream, start_proxy, CHUNK_LIMIT)

    async def body() -> AsyncIterator[bytes]:
        yield PIECE
        await asyncio.wait_for(sink.first_bytes.wait(), 10)
        for _ in range(15):
            yield PIECE

    try:
        answer = await fetch(proxy.session, "POST", f"{proxy.url}/v1/upload", data=body())
    except aiohttp.ClientError:
        pass  # the proxy may close while the client still writes; the upstream is what matters
    else:
        assert_error(413, "body_too_large", answer)
    await sink.assert_cut(CHUNK_LIMIT)


async def test_closed_upstream_port_is_502(start_proxy, canary_env):
    proxy = await start_proxy(env_config(f"http://127.0.0.1:{free_port()}"))
    answer = await fetch(proxy.session, "GET", f"{proxy.url}/v1/models", headers={"X-Request-Id": "r-502"})
    assert assert_error(502, "upstream_unreachable", answer) == "r-502"


STALL_TIMEOUTS = "upstream_timeout = 30\nidle_timeout = 0.5"  # a stall mid-body is idle_timeout's


@pytest.fixture
async def stalled_upstream(raw_upstream):  # type: ignore[no-untyped-def]
    """An upstream that never answers /v1/slow and stops after the head on /v1/half."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    async def half(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = int(request.query.get("length", "100"))
        await response.prepare(request)
        await response.write(b'{"partial":')
        await release.wait()
        return response

    app = web.Application()
    app.router.add_get("/v1/slow", slow)
    app.router.add_get("/v1/half", half)
    try:
        yield await raw_upstream(app)
    finally:
        release.set()


async def test_slow_upstream_is_504(stalled_upstream, start_proxy, canary_env):
    proxy = await start_proxy(env_config(stalled_upstream, server="upstream_timeout = 0.5"))
    answer = await fetch(proxy.session, "GET", f"{proxy.url}/v1/slow")
    assert_error(504, "upstream_timeout", answer)


async def test_upstream_stalling_mid_large_body_cuts_the_client(stalled_upstream, start_proxy, canary_env):
    # A large body streams, so its status line is out before the stall: all that is left
    # is to cut the client's connection, which the client sees as a broken payload.
    proxy = await start_proxy(env_config(stalled_upstream, server=STALL_TIMEOUTS))
    async with proxy.session.get(f"{proxy.url}/v1/half?length=1000000") as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_upstream_stalling_mid_small_body_is_a_clean_504(stalled_upstream, start_proxy, canary_env):
    # A small body is read whole before anything is sent, so a stall is still a clean 504.
    proxy = await start_proxy(env_config(stalled_upstream, server=STALL_TIMEOUTS))
    async with proxy.session.get(f"{proxy.url}/v1/half") as r:
        assert r.status == 504
        assert (await r.json())["error"]["code"] == "upstream_timeout"


# -- upstream errors: passed through, scrubbed of the key --------------------------------------


def envelope(status: int, error_id: str, message: str) -> bytes:
    body = {
        "status": False,
        "response": message,
        "error": {"http_status": status, "message": message, "error_id": error_id},
    }
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("status", "error_id"),
    [
        (400, "BAD_REQUEST"),
        (401, "UNAUTHORIZED"),
        (402, "INSUFFICIENT_CREDITS"),
        (404, "MODEL_NOT_FOUND"),
        (422, "VALIDATION_ERROR"),
        (451, "CONTENT_POLICY_VIOLATION"),
        (500, "INFERENCE_ERROR"),
        (503, "SERVICE_UNAVAILABLE"),
        (504, "INFERENCE_TIMEOUT"),
    ],
)
async def test_upstream_errors_pass_through(status, error_id, raw_upstream, start_proxy, canary_env):
    body = envelope(status, error_id, f"upstream says {status}")

    async def failing(request: web.Request) -> web.Response:
        return web.Response(
            status=status, body=body, content_type="application/json", headers={"X-Upstream": "1"}
        )

    app = web.Application()
    app.router.add_post("/v1/predictions", failing)
    proxy = await start_proxy(env_config(await raw_upstream(app)))
    got_status, headers, got = await fetch(
        proxy.session, "POST", f"{proxy.url}/v1/predictions", json={"model": "m"}, headers=USER
    )
    assert (got_status, got) == (status, body)
    assert headers["Content-Type"].startswith("application/json")
    assert headers["X-Upstream"] == "1"
    assert SANE_ID.fullmatch(headers["X-Request-Id"])


def key_echo_app(encode: str, pieces: int = 1) -> web.Application:
    """Answers 400 with the x-api-key it received, encoded and written in `pieces` parts."""

    async def echo_key(request: web.Request) -> web.StreamResponse:
        key = request.headers["x-api-key"]
        text = f'{{"error": {{"message": "key {key} is not valid for this model; {key}{key}"}}}}'
        data = text.encode()
        headers = {"Content-Type": "application/json", "X-Debug": f"got {key}"}
        if encode.lower() in ("gzip", "x-gzip"):
            data = gzip.compress(data)
            headers["Content-Encoding"] = encode
        elif encode.lower() == "deflate":
            data = zlib.compress(data)
            headers["Content-Encoding"] = encode
        response = web.StreamResponse(status=400, headers=headers)
        await response.prepare(request)
        size = -(-len(data) // pieces)
        for i in range(0, len(data), size):
            await response.write(data[i : i + size])
            if pieces > 1:
                await asyncio.sleep(0.02)  # separate reads at the proxy, so pieces stay pieces
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/predictions", echo_key)
    return app


def decoded(headers: CIMultiDict[str], body: bytes) -> bytes:
    encoding = headers.get("Content-Encoding")
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


@pytest.mark.parametrize(
    ("encode", "pieces"),
    [
        ("identity", 1),
        ("identity", 7),
        ("identity", 25),
        ("gzip", 1),
        ("gzip", 9),
        ("deflate", 5),
        ("x-gzip", 3),
        ("GZIP", 3),  # coding names are case-insensitive
        ("Deflate", 1),
    ],
)
async def test_key_in_an_upstream_error_is_masked(encode, pieces, raw_upstream, start_proxy, canary_env):
    proxy = await start_proxy(env_config(await raw_upstream(key_echo_app(encode, pieces))))
    status, headers, body = await fetch(
        proxy.session,
        "POST",
        f"{proxy.url}/v1/predictions",
        json={"model": "m"},
        headers={**USER, "Accept-Encoding": "gzip, deflate, br"},
    )
    assert status == 400
    plain = decoded(headers, body)
    assert_no_canary(plain.decode(), body.decode("latin-1"), str(headers))
    message = json.loads(plain)["error"]["message"]
    assert message == f"key {MASK} is not valid for this model; {MASK}{MASK}"
    assert headers["X-Debug"] == f"got {MASK}"


async def test_upstream_429_passes_through_with_retry_after(raw_upstream, start_proxy, canary_env):
    body = envelope(429, "RATE_LIMIT_EXCEEDED", "Too many requests")

    async def limited(request: web.Request) -> web.Response:
        return web.Response(
            status=429,
            body=body,
            content_type="application/json",
            headers={"Retry-After": "17", "x-skytells-ratelimit-remaining-requests": "0"},
        )

    app = web.Application()
    app.router.add_post("/v1/predictions", limited)
    proxy = await start_proxy(env_config(await raw_upstream(app)))
    status, headers, got = await fetch(
        proxy.session, "POST", f"{proxy.url}/v1/predictions", json={"model": "m"}, headers=USER
    )
    assert (status, got) == (429, body)
    assert headers["Retry-After"] == "17"
    assert headers["x-skytells-ratelimit-remaining-requests"] == "0"
    _, _, metrics = await fetch(proxy.session, "GET", f"{proxy.url}/-/metrics")
    assert re.search(rb'skyproxy_upstream_rate_limited_total\{environment="dev"\} 1\.0', metrics)


async def test_upstream_cors_headers_are_not_relayed(raw_upstream, start_proxy, canary_env):
    async def permissive(request: web.Request) -> web.Response:
        headers = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "true"}
        return web.json_response({"data": []}, headers=headers)

    app = web.Application()
    app.router.add_get("/v1/models", permissive)
    origin = "http://localhost:3000"
    server = f'allowed_origins = ["{origin}"]'
    proxy = await start_proxy(env_config(await raw_upstream(app), server=server))
    _, headers, _ = await fetch(proxy.session, "GET", f"{proxy.url}/v1/models", headers={"Origin": origin})
    assert headers.getall("Access-Control-Allow-Origin") == [origin]
    assert "Access-Control-Allow-Credentials" not in headers
    _, headers, _ = await fetch(proxy.session, "GET", f"{proxy.url}/v1/models")
    assert "Access-Control-Allow-Origin" not in headers


# -- memory stays flat while 200 MiB stream through a daemon ------------------------------------

BIG = 200 * MIB
BLOCK = os.urandom(256 * 1024)
RSS_GROWTH_LIMIT_KIB = 60 * 1024


def big_digest() -> str:
    digest = hashlib.sha256()
    for _ in range(BIG // len(BLOCK)):
        digest.update(BLOCK)
    return digest.hexdigest()


async def blocks(total: int) -> AsyncIterator[bytes]:
    for _ in range(total // len(BLOCK)):
        yield BLOCK


@pytest.fixture
async def big_transfer(raw_upstream, run_daemon, tmp_path, canary_env):  # type: ignore[no-untyped-def]
    """A daemon in front of an upstream that swallows /v1/upload and streams /v1/download."""
    uploads: list[tuple[int, str]] = []

    async def upload(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(len(BLOCK)):
            size += len(chunk)
            digest.update(chunk)
            if size >= 20 * MIB and size - len(chunk) < 20 * MIB:
                await asyncio.sleep(1)  # stop reading a while: the proxy must not buffer meanwhile
        uploads.append((size, digest.hexdigest()))
        return web.json_response({"size": size})

    async def download(request: web.Request) -> web.StreamResponse:
        total = int(request.query["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = total
        await response.prepare(request)
        async for block in blocks(total):
            await response.write(block)
        await response.write_eof()
        return response

    app = web.Application(client_max_size=BIG * 2)
    app.router.add_post("/v1/upload", upload)
    app.router.add_get("/v1/download", download)
    upstream = await raw_upstream(app)
    port = free_port()
    server = 'max_body_bytes = 314572800\nlog_level = "warning"'
    path = write_config(tmp_path, env_config(upstream, listen=f"127.0.0.1:{port}", server=server))
    daemon = await asyncio.to_thread(run_daemon, path, port, {"SKYPROXY_TEST_KEY": CANARY})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        # Warm up both directions, so the baseline includes pools, buffers and imports.
        for _ in range(3):
            async with session.post(f"{daemon.url}/v1/upload", data=blocks(8 * MIB)) as r:
                assert r.status == 200, await r.text()
            async with session.get(f"{daemon.url}/v1/download?size={8 * MIB}") as r:
                assert r.status == 200
                await r.read()
        uploads.clear()
        yield daemon, session, uploads


async def test_200_mib_upload_keeps_proxy_memory_flat(big_transfer):
    daemon, session, uploads = big_transfer
    pid = daemon.process.pid
    baseline = rss_kib(pid)
    with RssSampler(pid) as sampler:
        async with session.post(f"{daemon.url}/v1/upload", data=blocks(BIG)) as r:
            assert r.status == 200, await r.text()
    assert uploads == [(BIG, await asyncio.to_thread(big_digest))]
    growth = sampler.peak - baseline
    assert growth < RSS_GROWTH_LIMIT_KIB, f"proxy RSS grew {growth // 1024} MiB for a 200 MiB upload"


async def test_200_mib_download_keeps_proxy_memory_flat(big_transfer):
    daemon, session, _ = big_transfer
    pid = daemon.process.pid
    baseline = rss_kib(pid)
    digest, size = hashlib.sha256(), 0
    with RssSampler(pid) as sampler:
        async with session.get(f"{daemon.url}/v1/download?size={BIG}") as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(len(BLOCK)):
                size += len(chunk)
                digest.update(chunk)
                if size >= 20 * MIB and size - len(chunk) < 20 * MIB:
                    await asyncio.sleep(1)  # stop reading a while: the proxy must not buffer meanwhile
    assert size == BIG
    assert digest.hexdigest() == await asyncio.to_thread(big_digest)
    growth = sampler.peak - baseline
    assert growth < RSS_GROWTH_LIMIT_KIB, f"proxy RSS grew {growth // 1024} MiB for a 200 MiB download"
