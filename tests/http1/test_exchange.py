"""Exchanges through the whole proxy: keep-alive, framing, odd answers, stale connections.

Upstreams here are raw asyncio servers on ephemeral ports, so a test controls every byte
the proxy reads and counts the TCP connections it opens. The proxy runs in process;
nothing of the client is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest
from helpers import CANARY, env_config
from helpers.http import assert_error, fetch, host_of, http_head, raw_request, read_response
from helpers.raw_upstream import TIMEOUT, Peer, Script, answer, echo, keep_alive, upload
from multidict import CIMultiDict
from yarl import URL

from skyproxy.http1 import Client, Origin

MIB = 1024 * 1024


async def call(
    proxy: object, method: str = "GET", path: str = "/v1/models", **kwargs: object
) -> tuple[int, CIMultiDict[str], bytes]:
    session: aiohttp.ClientSession = proxy.session  # type: ignore[attr-defined]
    url: str = proxy.url  # type: ignore[attr-defined]
    return await asyncio.wait_for(fetch(session, method, f"{url}{path}", **kwargs), TIMEOUT)


async def exchange(
    client: Client, origin: Origin, target: str, method: str = "GET", body: bytes | None = None
) -> tuple[int, bytes]:
    """One request straight through the client: the status and the whole body."""
    response = await asyncio.wait_for(
        client.request(method, origin, target, b"x-api-key: k\r\n", body), TIMEOUT
    )
    async with response:
        return response.status, await asyncio.wait_for(response.read(), TIMEOUT)


# -- keep-alive ---------------------------------------------------------------------------------


async def test_sequential_requests_share_one_connection(raw_server, start_proxy, canary_env):
    upstream = await raw_server(keep_alive)
    proxy = await start_proxy(env_config(upstream.url))
    for n in range(20):
        status, _, body = await call(proxy, path=f"/v1/models/{n}")
        assert status == 200
        assert json.loads(body) == {"path": f"/v1/models/{n}", "connection": 1}
    assert upstream.connections == 1
    assert [s.target for s in upstream.seen] == [f"/v1/models/{n}" for n in range(20)]
    # The head is whole on every reuse: the key and the Host of the upstream, once each.
    for seen in upstream.seen:
        assert seen.headers.getall("x-api-key") == [CANARY]
        assert seen.headers.getall("Host") == [host_of(upstream.url)]


async def test_concurrent_requests_never_open_more_connections_than_in_flight(
    raw_server, start_proxy, canary_env
):
    everyone = asyncio.Event()
    arrived = 0

    async def gated(peer: Peer) -> None:
        nonlocal arrived
        while (seen := await peer.request()) is not None:
            arrived += 1
            if arrived == 16:
                everyone.set()
            await asyncio.wait_for(everyone.wait(), TIMEOUT)  # so all 16 are in flight at once
            await peer.send(echo(seen))

    upstream = await raw_server(gated)
    proxy = await start_proxy(env_config(upstream.url))
    answers = await asyncio.gather(*(call(proxy, path=f"/v1/c/{n}") for n in range(16)))
    assert [status for status, _, _ in answers] == [200] * 16
    assert upstream.connections == 16
    assert {s.connection for s in upstream.seen} == set(range(1, 17))
    for n in range(20):
        status, _, _ = await call(proxy, path=f"/v1/s/{n}")
        assert status == 200
    answers = await asyncio.gather(*(call(proxy, path=f"/v1/again/{n}") for n in range(16)))
    assert [status for status, _, _ in answers] == [200] * 16
    assert upstream.connections == 16
    assert len(upstream.seen) == 52


# -- framing: informational answers, close-delimited bodies, truncation ----------------------

CREATED = b'{"id": "pred-1", "status": "starting"}'
FINAL = answer(201, CREATED, "Content-Type: application/json")
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\nX-Interim: yes\r\n\r\n"


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "separate-writes"])
@pytest.mark.parametrize(
    "interim",
    [EARLY_HINTS, CONTINUE, CONTINUE + EARLY_HINTS + EARLY_HINTS],
    ids=["103", "100", "100-103-103"],
)
async def test_informational_answers_are_skipped(interim, split, raw_server, start_proxy, canary_env):
    async def hints(peer: Peer) -> None:
        while await peer.request() is not None:
            if split:
                await peer.send(interim)
                await asyncio.sleep(0.05)  # so the proxy reads the interim answer on its own
                await peer.send(FINAL)
            else:
                await peer.send(interim + FINAL)

    upstream = await raw_server(hints)
    proxy = await start_proxy(env_config(upstream.url))
    for _ in range(2):
        status, headers, body = await call(
            proxy, "POST", "/v1/predictions", json={"model": "m"}, headers={"X-User-Id": "alice"}
        )
        assert (status, body) == (201, CREATED)
        assert headers["Content-Type"] == "application/json"
        assert "Link" not in headers
        assert "X-Interim" not in headers
    assert upstream.connections == 1  # and the connection is still good after them


@pytest.mark.parametrize("size", [12, 300_000])
async def test_body_ended_by_close_arrives_whole_and_its_connection_is_not_reused(
    size, raw_server, start_proxy, canary_env
):
    payload = os.urandom(size)

    async def unframed(peer: Peer) -> None:
        if await peer.request() is None:
            return
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        for i in range(0, size, 65_536):
            await peer.send(payload[i : i + 65_536])
        # returning closes the connection: the only end this body has

    upstream = await raw_server(unframed)
    proxy = await start_proxy(env_config(upstream.url))
    for n in (1, 2):
        status, headers, body = await call(proxy, path="/v1/files/x")
        assert status == 200
        assert headers["Content-Type"] == "application/octet-stream"
        assert body == payload
        assert upstream.connections == n


def truncated_first(declared: int) -> Script:
    """Connection 1 declares `declared` bytes, sends 50 and closes; the rest behave."""

    async def script(peer: Peer) -> None:
        if peer.number > 1:
            await keep_alive(peer)
            return
        if await peer.request() is None:
            return
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
        await peer.send(head.encode() + b"x" * 50)

    return script


async def test_truncated_small_body_is_a_clean_502_and_a_new_connection_follows(
    raw_server, start_proxy, canary_env
):
    upstream = await raw_server(truncated_first(100))
    proxy = await start_proxy(env_config(upstream.url))
    assert_error(502, "upstream_unreachable", await call(proxy))
    status, _, body = await call(proxy, path="/v1/next")
    assert status == 200
    assert json.loads(body) == {"path": "/v1/next", "connection": 2}
    assert [s.connection for s in upstream.seen] == [1, 2]


async def test_truncated_large_body_cuts_the_client_and_a_new_connection_follows(
    raw_server, start_proxy, canary_env
):
    # Over SMALL_BODY the answer streams: its status line is out before the cut.
    upstream = await raw_server(truncated_first(1_000_000))
    proxy = await start_proxy(env_config(upstream.url))
    async with proxy.session.get(f"{proxy.url}/v1/models") as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(r.read(), TIMEOUT)
    status, _, body = await call(proxy, path="/v1/next")
    assert status == 200
    assert json.loads(body)["connection"] == 2


# -- answers that are not HTTP, or too big a head -----------------------------------------------


@pytest.mark.parametrize(("count", "fits"), [(60, True), (70, False)])
async def test_answer_headers_over_64_kib_are_a_502(count, fits, raw_server, start_proxy, canary_env):
    # Each header counts 10 + 1000 + 4 bytes: 60 of them fit in 64 KiB, 70 do not.
    filler = [f"X-Fill-{i:03d}: {'a' * 1000}" for i in range(count)]

    async def bloated(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(answer(200, b"{}", "Content-Type: application/json", *filler))
            if not fits:
                await peer.until_eof()  # the proxy must give up on it and close

    upstream = await raw_server(bloated)
    proxy = await start_proxy(env_config(upstream.url))
    got = await call(proxy)
    if fits:
        status, headers, body = got
        assert (status, body) == (200, b"{}")
        assert headers["X-Fill-059"] == "a" * 1000
    else:
        assert_error(502, "upstream_unreachable", got)
        await upstream.wait_eof(1)


@pytest.mark.parametrize(
    "garbage",
    [
        b"SSH-2.0-OpenSSH_9.6p1 Debian-3\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),
        b"<html><body>It works!</body></html>\r\n\r\n",
        b"HTTP/1.1 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    ],
    ids=[
        "ssh-banner",
        "tls-bytes",
        "html",
        "no-status-code",
        "two-lengths",
        "length-and-chunked",
        "bad-chunk-size",
        "upgrade",
    ],
)
async def test_garbage_answer_is_a_502_and_the_connection_closed(
    garbage, raw_server, start_proxy, canary_env
):
    async def nonsense(peer: Peer) -> None:
        if await peer.request() is None:
            return
        await peer.send(garbage)
        await peer.until_eof()  # it stays open: the proxy must not wait for the close

    upstream = await raw_server(nonsense)
    proxy = await start_proxy(env_config(upstream.url))
    assert_error(502, "upstream_unreachable", await call(proxy))
    await upstream.wait_eof(1)


# -- stale kept-alive connections: retried only where sending twice is harmless -----------------


async def stale_after_first(peer: Peer) -> None:
    """Connection 1 answers once, then reads the next request and closes without a word."""
    if peer.number > 1:
        await keep_alive(peer)
        return
    first = await peer.request()
    if first is None:
        return
    await peer.send(echo(first))
    await peer.request()


async def streamed(data: bytes) -> AsyncIterator[bytes]:
    yield data  # no Content-Length: the proxy streams it on, and cannot replay it


@pytest.mark.parametrize(
    ("method", "body", "retried"),
    [
        ("GET", None, True),
        ("DELETE", None, True),
        ("PUT", b'{"a": 1}', True),
        ("POST", b'{"a": 1}', False),
        ("PATCH", b'{"a": 1}', False),
        ("PUT", "streamed", False),
    ],
    ids=["GET", "DELETE", "PUT", "POST", "PATCH", "PUT-streamed"],
)
async def test_stale_connection(method, body, retried, raw_server, start_proxy, canary_env):
    upstream = await raw_server(stale_after_first)
    proxy = await start_proxy(env_config(upstream.url))
    status, _, _ = await call(proxy, path="/v1/first")
    assert status == 200
    data = streamed(b'{"a": 1}') if body == "streamed" else body
    got = await call(proxy, method, "/v1/second", data=data)
    sent = [(s.method, s.target, s.connection) for s in upstream.seen]
    if retried:
        assert got[0] == 200, got
        assert json.loads(got[2]) == {"path": "/v1/second", "connection": 2}
        assert sent == [("GET", "/v1/first", 1), (method, "/v1/second", 1), (method, "/v1/second", 2)]
        assert upstream.connections == 2
        assert upstream.seen[-1].body == (body or b"")
    else:
        assert_error(502, "upstream_unreachable", got)
        assert sent == [("GET", "/v1/first", 1), (method, "/v1/second", 1)]
        assert upstream.seen[-1].body == b'{"a": 1}'
        # The next request gets a fresh connection, and the failed one was never sent again.
        status, _, _ = await call(proxy, path="/v1/third")
        assert status == 200
        sent = [(s.method, s.target, s.connection) for s in upstream.seen]
        assert sent[2:] == [("GET", "/v1/third", 2)]


SECOND_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Unasked: yes\r\n\r\nextra"


@pytest.mark.parametrize(
    ("extra", "split"),
    [
        pytest.param(SECOND_ANSWER, False, id="same-write-a-second-answer"),
        pytest.param(SECOND_ANSWER, True, id="later-write-a-second-answer"),
        pytest.param(b"junk!", False, id="same-write-junk"),
        pytest.param(b"junk!", True, id="later-write-junk"),
    ],
)
async def test_bytes_beyond_the_answer_are_dropped_with_the_connection(extra, split, raw_server):
    async def chatty(peer: Peer) -> None:
        if peer.number > 1:
            await keep_alive(peer)
            return
        if await peer.request() is None:
            return
        if split:
            await peer.send(answer(200, b'{"n": 1}'))
            await asyncio.sleep(0.05)
            await peer.send(extra)
        else:
            await peer.send(answer(200, b'{"n": 1}') + extra)
        await peer.until_eof()

    upstream = await raw_server(chatty)
    client = Client()
    origin = Origin.parse(upstream.url)
    try:
        assert await exchange(client, origin, "/v1/a") == (200, b'{"n": 1}')
        await upstream.wait_eof(1)  # closed on the extra bytes, even while idle in the pool
        status, body = await exchange(client, origin, "/v1/b")
        assert (status, json.loads(body)["connection"]) == (200, 2)
    finally:
        await client.close()


async def test_an_unasked_second_answer_never_reaches_the_client(raw_server, start_proxy, canary_env):
    async def chatty(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(answer(200, b'{"n": 1}', "Content-Type: application/json") + SECOND_ANSWER)

    upstream = await raw_server(chatty)
    proxy = await start_proxy(env_config(upstream.url))
    status, headers, body = await call(proxy)
    assert (status, body) == (200, b'{"n": 1}')
    assert "X-Unasked" not in headers
    await call(proxy)
    assert upstream.connections == 2  # a connection that spoke out of turn is not trusted again


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n",
        b"HTTP/1.0 200 OK\r\n",  # 1.0 without keep-alive: one answer per connection
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_answer_that_ends_the_connection_is_not_reused(head, raw_server, start_proxy, canary_env):
    async def closing(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(head + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        # it stays open until the proxy closes it: the header alone must make it do so

    upstream = await raw_server(closing)
    proxy = await start_proxy(env_config(upstream.url))
    for n in (1, 2, 3):
        status, _, body = await call(proxy)
        assert (status, body) == (200, b"{}")
        assert upstream.connections == n
        await upstream.wait_eof(n)
    assert [s.connection for s in upstream.seen] == [1, 2, 3]


# -- bodyless answers: no body, and their connection is not reused ---------------------------


async def bodyless(peer: Peer) -> None:
    while (seen := await peer.request()) is not None:
        if seen.method == "HEAD":
            # The length a GET would have, and no body: the framing must not wait for 1234 bytes.
            await peer.send(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1234\r\n\r\n"
            )
        elif seen.target == "/v1/204":
            await peer.send(b"HTTP/1.1 204 No Content\r\nX-Empty: yes\r\n\r\n")
        elif seen.target == "/v1/304":
            await peer.send(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n')
        else:
            await peer.send(echo(seen))


async def test_head_answer_has_no_body_and_its_connection_is_not_reused(raw_server, start_proxy, canary_env):
    upstream = await raw_server(bodyless)
    proxy = await start_proxy(env_config(upstream.url))
    target = URL(proxy.url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        # One client connection: a body after the HEAD's head would be read as the GET's answer.
        writer.write(http_head("HEAD", "/v1/models", [("Host", host_of(proxy.url))]))
        status = await asyncio.wait_for(reader.readline(), TIMEOUT)
        assert status.split()[1] == b"200"
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert b"Content-Length: 1234\r\n" in head
        writer.write(http_head("GET", "/v1/after-head", [("Host", host_of(proxy.url))]))
        got = await asyncio.wait_for(read_response(reader), TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert got.status == 200
    # Not reused: bytes the upstream sent after the HEAD's head would be read as this answer.
    assert got.json() == {"path": "/v1/after-head", "connection": 2}
    assert upstream.connections == 2


@pytest.mark.parametrize("status", [204, 304])
async def test_no_content_answer_has_no_body_and_its_connection_is_not_reused(
    status, raw_server, start_proxy, canary_env
):
    upstream = await raw_server(bodyless)
    proxy = await start_proxy(env_config(upstream.url))
    got, headers, body = await call(proxy, path=f"/v1/{status}")
    assert (got, body) == (status, b"")
    assert headers.get("X-Empty" if status == 204 else "ETag") == ("yes" if status == 204 else '"v1"')
    got, _, body = await call(proxy, path="/v1/after")
    assert got == 200
    assert json.loads(body) == {"path": "/v1/after", "connection": 2}
    assert upstream.connections == 2


# -- an answer before the upload is over --------------------------------------------------------


@pytest.mark.parametrize("linger", [True, False], ids=["lingering-close", "abrupt-close"])
async def test_early_answer_during_an_upload(linger, raw_server, start_proxy, canary_env):
    refusal = b'{"error": {"code": "too_large"}}'

    async def refuse_uploads(peer: Peer) -> None:
        while (seen := await peer.request(body=False)) is not None:
            if seen.method != "POST":
                await peer.send(echo(seen))
                continue
            # Only the head was read: answer at once, and stop taking the body.
            await peer.send(answer(413, refusal, "Content-Type: application/json", "Connection: close"))
            if linger:
                peer.writer.write_eof()
                await peer.until_eof()  # as nginx does: drain, so nothing is reset
            return

    upstream = await raw_server(refuse_uploads)
    proxy = await start_proxy(env_config(upstream.url, server="max_body_bytes = 67108864"))
    try:
        status, headers, body = await call(proxy, "POST", "/v1/upload", data=upload(16 * MIB))
    except aiohttp.ClientError as exc:
        status, headers, body = 0, CIMultiDict(), repr(exc).encode()
    if linger:
        assert status == 413, body
        assert json.loads(body) == json.loads(refusal)
        assert headers["Content-Type"].startswith("application/json")
        await upstream.wait_eof(1)  # the proxy stopped the upload and closed the connection
    else:
        # A reset may take the answer with it; what is left must still be an answer.
        assert status in (413, 502), body
        if status == 502:
            assert_error(502, "upstream_unreachable", (status, headers, body))
    status, _, body = await call(proxy, path="/v1/after")
    assert status == 200
    assert json.loads(body) == {"path": "/v1/after", "connection": 2}


async def test_exchanges_leave_no_cyclic_garbage(mock_upstream, start_proxy, canary_env):
    """Every answer is freed by reference counting: none waits for the cycle collector,
    which would cost CPU and pause the loop (the parser holds the answer's methods)."""
    import gc

    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url))
    body = b'{"model":"truefusion-pro","input":{"prompt":"x"}}'

    def head(user: int) -> list[tuple[str, str]]:
        return [("Host", host_of(proxy.url)), ("X-User-Id", f"u{user}"), ("Content-Type", "application/json")]

    def create(user: int) -> bytes:
        return http_head("POST", "/v1/predictions", [*head(user), ("Content-Length", str(len(body)))]) + body

    assert (await raw_request(proxy.url, create(0))).status == 201
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for user in range(1, 21):
            assert (await raw_request(proxy.url, create(user))).status == 201
            assert (await raw_request(proxy.url, http_head("GET", "/v1/models", head(user)))).status == 200
        gc.collect()
        ours = [o for o in gc.garbage if type(o).__module__.startswith(("skyproxy", "httptools"))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert ours == []
