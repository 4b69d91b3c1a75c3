"""The framing faults found by feeding the client hostile bytes, each pinned at the byte level.

Every upstream here is a raw socket script; the client is used directly, nothing mocked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from helpers.raw_upstream import TIMEOUT, Peer, RawUpstream, answer, echo, echo_body, keep_alive

from skyproxy.http1 import Client, IncompleteBody, Origin, ProtocolError, Response

MIB = 1024 * 1024


async def ask(client: Client, upstream: RawUpstream, target: str = "/v1/a", method: str = "GET") -> Response:
    origin = Origin.parse(upstream.url)
    return await asyncio.wait_for(client.request(method, origin, target, b"x-api-key: k\r\n", None), TIMEOUT)


async def read_all(
    client: Client, upstream: RawUpstream, target: str, method: str = "GET"
) -> tuple[int, bytes]:
    async with await ask(client, upstream, target, method) as response:
        return response.status, await asyncio.wait_for(response.read(), TIMEOUT)


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    client = Client()
    yield client
    await client.close()


# -- 1. a body cut short is an error the caller can tell from an end ----------------------------


@pytest.mark.parametrize(
    ("head", "sent"),
    [
        pytest.param(b"Content-Length: 100\r\n\r\n", b"x" * 50, id="content-length"),
        pytest.param(b"Transfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n", id="chunked-no-last-chunk"),
        pytest.param(
            b"Transfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n0\r\n", id="chunked-no-final-crlf"
        ),
    ],
)
async def test_a_body_cut_short_raises_incomplete_body_after_what_arrived(head, sent, raw_server, client):
    async def cut(peer: Peer) -> None:
        if await peer.request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\n" + head + sent)  # then the close

    upstream = await raw_server(cut)
    response = await ask(client, upstream)
    async with response:
        assert response.status == 200
        pieces = []
        with pytest.raises(IncompleteBody):
            async for piece in response.iter_any():
                pieces.append(piece)
    assert b"".join(pieces) in (b"x" * 50, b"hello")
    async with await ask(client, upstream) as again:
        with pytest.raises(IncompleteBody):
            await asyncio.wait_for(again.read(), TIMEOUT)


# -- 2. trailers never become headers ------------------------------------------------------------

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Head: yes\r\n\r\n"
TRAILED_BODY = b"5\r\nhello\r\n0\r\nLocation: /evil\r\nContent-Encoding: gzip\r\n\r\n"


@pytest.mark.parametrize("split", [False, True], ids=["one-read", "body-later"])
async def test_trailers_never_become_headers(split, raw_server, client):
    async def trailing(peer: Peer) -> None:
        while await peer.request() is not None:
            if split:
                await peer.send(CHUNKED_HEAD)
                await peer.send(TRAILED_BODY)
            else:
                await peer.send(CHUNKED_HEAD + TRAILED_BODY)

    upstream = await raw_server(trailing)
    for _ in range(2):
        async with await ask(client, upstream) as response:
            body = await asyncio.wait_for(response.read(), TIMEOUT)
            assert body == b"hello"
            assert response.headers == [(b"Transfer-Encoding", b"chunked"), (b"X-Head", b"yes")]
            assert response.content_encoding is None
            assert response.trailers == [(b"Location", b"/evil"), (b"Content-Encoding", b"gzip")]
    assert upstream.connections == 1  # a chunked answer with trailers ends cleanly


async def test_trailers_count_against_the_head_limit(raw_server, client):
    async def bloated(peer: Peer) -> None:
        if await peer.request() is not None:
            await peer.send(CHUNKED_HEAD + b"5\r\nhello\r\n0\r\nX-Trailer: " + b"t" * 70_000 + b"\r\n\r\n")
            await peer.until_eof()

    upstream = await raw_server(bloated)
    # Here it all arrives in one read, so the answer fails before its head is handed out.
    with pytest.raises(ProtocolError, match="trailers over 65536 bytes"):
        async with await ask(client, upstream) as response:
            await asyncio.wait_for(response.read(), TIMEOUT)
    await upstream.wait_eof(1)


# -- 3. an unterminated header line is refused while it grows -----------------------------------


@pytest.mark.parametrize("where", ["header-value", "header-name", "trailer"])
async def test_a_line_that_never_ends_fails_fast_with_bounded_reading(where, raw_server, client):
    sent = 0
    start = {
        "header-value": b"HTTP/1.1 200 OK\r\nX-Big: ",
        "header-name": b"HTTP/1.1 200 OK\r\nX-",
        "trailer": CHUNKED_HEAD + b"5\r\nhello\r\n0\r\nX-Big: ",
    }[where]

    async def endless(peer: Peer) -> None:
        nonlocal sent
        if await peer.request() is None:
            return
        await peer.send(start)
        piece = b"a" * 65_536
        while sent < 256 * MIB:  # the 256 MB line; the client must give up long before
            await peer.send(piece)
            sent += len(piece)

    upstream = await raw_server(endless)
    with pytest.raises(ProtocolError, match="over 65536 bytes"):
        async with await ask(client, upstream) as response:
            await asyncio.wait_for(response.read(), TIMEOUT)
    # Read no further than the limit and one read; the rest is what the socket buffers held.
    assert sent < 32 * MIB
    assert client.connections == 0


# -- 4. the reason phrase: exact, and counted -------------------------------------------------


async def test_a_reason_in_many_pieces_arrives_exact(raw_server, client):
    reason = bytes(range(0x80, 0x100)) * 100 + b" plain words"  # obs-text too: exact bytes

    async def slow_reason(peer: Peer) -> None:
        while (seen := await peer.request()) is not None:
            await peer.send(b"HTTP/1.1 418 ")
            for i in range(0, len(reason), 1000):
                await peer.send(reason[i : i + 1000])
                await asyncio.sleep(0.001)  # so the client reads the line in many pieces
            await peer.send(b"\r\n" + echo(seen).split(b"\r\n", 1)[1])

    upstream = await raw_server(slow_reason)
    async with await ask(client, upstream) as response:
        assert (response.status, response.reason) == (418, reason)
        await response.read()


async def test_a_huge_reason_counts_against_the_head_limit(raw_server, client):
    async def huge(peer: Peer) -> None:
        if await peer.request() is not None:
            await peer.send(b"HTTP/1.1 200 " + b"R" * MIB + b"\r\nContent-Length: 0\r\n\r\n")
            await peer.until_eof()

    upstream = await raw_server(huge)
    with pytest.raises(ProtocolError, match="answer head over 65536 bytes"):
        await ask(client, upstream)
    await upstream.wait_eof(1)


# -- 5. no reuse after an answer without a body --------------------------------------------------

LATE_BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"


@pytest.mark.parametrize(
    ("method", "target", "head"),
    [
        ("HEAD", "/v1/a", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        ("GET", "/v1/204", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", "/v1/304", b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n'),
    ],
    ids=["HEAD", "204", "304"],
)
async def test_no_reuse_after_an_answer_without_a_body(method, target, head, raw_server, client):
    async def late_bytes(peer: Peer) -> None:
        if peer.number > 1:
            await keep_alive(peer)
            return
        if await peer.request() is None:
            return
        await peer.send(head)
        # Bytes that belong to nothing, arriving once the next request went out: on a
        # reused connection they would be read as its answer.
        if await peer.request() is not None:
            await peer.send(LATE_BODY)
        await peer.until_eof()

    upstream = await raw_server(late_bytes)
    assert await read_all(client, upstream, target, method) == (int(head[9:12]), b"")
    status, body = await read_all(client, upstream, "/v1/next")
    assert (status, body) == (200, echo_body("/v1/next", 2))
    assert [(s.target, s.connection) for s in upstream.seen] == [(target, 1), ("/v1/next", 2)]
    await upstream.wait_eof(1)


async def test_an_idle_connection_that_receives_bytes_is_closed(raw_server, client):
    async def chatty(peer: Peer) -> None:
        if peer.number > 1:
            await keep_alive(peer)
            return
        if await peer.request() is None:
            return
        await peer.send(answer(200, b"{}"))
        await asyncio.sleep(0.03)  # while the connection is idle in the pool
        await peer.send(LATE_BODY)
        await peer.until_eof()

    upstream = await raw_server(chatty)
    assert await read_all(client, upstream, "/v1/a") == (200, b"{}")
    await upstream.wait_eof(1)  # the client closed it on the stray bytes, unasked
    assert await read_all(client, upstream, "/v1/b") == (200, echo_body("/v1/b", 2))


# -- 6. an HTTP/1.0 answer: passed on with its status, its connection never reused -------------


@pytest.mark.parametrize(
    "connection_header", [b"Connection: keep-alive\r\n", b""], ids=["keep-alive", "no-keep-alive"]
)
async def test_an_http10_answer_is_read_and_its_connection_never_reused(
    connection_header, raw_server, client
):
    async def old(peer: Peer) -> None:
        while (seen := await peer.request()) is not None:
            body = seen.target.encode()
            await peer.send(
                b"HTTP/1.0 404 Not Found\r\n%sContent-Length: %d\r\n\r\n%s"
                % (connection_header, len(body), body)
            )
        # it stays open until the client closes it: the version alone must make it do so

    upstream = await raw_server(old)
    for n in (1, 2):
        async with await ask(client, upstream, f"/v1/{n}") as response:
            assert (response.status, response.version, response.reason) == (404, "1.0", b"Not Found")
            assert await response.read() == f"/v1/{n}".encode()
        await upstream.wait_eof(n)
    assert [s.connection for s in upstream.seen] == [1, 2]


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])
async def test_other_versions_are_a_protocol_error(version, raw_server, client):
    async def odd(peer: Peer) -> None:
        if await peer.request() is not None:
            await peer.send(version + b" 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await peer.until_eof()

    upstream = await raw_server(odd)
    with pytest.raises(ProtocolError, match="HTTP/"):
        await ask(client, upstream)
    await upstream.wait_eof(1)


# -- headers as bytes --------------------------------------------------------------------------


async def test_headers_arrive_byte_exact(raw_server, client):
    head = (
        b"HTTP/1.1 200 \xe9t\xe9\r\n"
        b"X-Odd: caf\xe9\r\n"
        b"x-lower-case: Mixed Value\r\n"
        b"X-Utf8: \xe2\x82\xac\r\n"
        b"X-Empty:\r\n"
        b"X-Odd: second\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )

    async def exact(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(head)

    upstream = await raw_server(exact)
    async with await ask(client, upstream) as response:
        assert response.reason == b"\xe9t\xe9"
        assert response.headers == [
            (b"X-Odd", b"caf\xe9"),
            (b"x-lower-case", b"Mixed Value"),
            (b"X-Utf8", b"\xe2\x82\xac"),
            (b"X-Empty", b""),
            (b"X-Odd", b"second"),
            (b"Content-Length", b"2"),
        ]
        assert await response.read() == b"{}"
