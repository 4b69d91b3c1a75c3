"""The relay, byte by byte: raw socket upstreams on one side, raw socket clients on the other.

What the upstream sends in its head reaches the client exactly (less the hop-by-hop
lines and the framing, which are the proxy's own); a body cut short resets the client's
connection; trailers never become headers.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from helpers import CANARY, assert_no_canary, env_config
from helpers.http import host_of
from helpers.raw_upstream import TIMEOUT, Peer
from yarl import URL

ODD_HEAD = b"X-Odd: caf\xe9\r\nx-lower-case: Mixed  Value\r\nX-Utf8: \xe2\x82\xac\r\nX-Empty:\r\n"


async def raw_exchange(proxy_url: str, request: bytes) -> tuple[bytes, bytes]:
    """Sends `request` as is and reads to the end: the head and the rest, as bytes."""
    target = URL(proxy_url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        writer.write(request)
        data = await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def get(proxy_url: str, target: str = "/v1/models", version: bytes = b"1.1") -> bytes:
    return b"GET %s HTTP/%s\r\nHost: %s\r\nConnection: close\r\n\r\n" % (
        target.encode(),
        version,
        host_of(proxy_url).encode(),
    )


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2 :]


@pytest.mark.parametrize(
    "framing",
    ["small", "large", "chunked"],
)
async def test_the_upstream_head_reaches_the_client_byte_exact(framing, raw_server, start_proxy, canary_env):
    body = b"x" * (100_000 if framing == "large" else 2)

    async def odd(peer: Peer) -> None:
        while await peer.request() is not None:
            head = b"HTTP/1.1 200 \xe9t\xe9\r\n" + ODD_HEAD
            if framing == "chunked":
                await peer.send(
                    head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
                )
            else:
                await peer.send(head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    upstream = await raw_server(odd)
    proxy = await start_proxy(env_config(upstream.url))
    head, rest = await raw_exchange(proxy.url, get(proxy.url))
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 \xe9t\xe9"
    # Names and values exact, in order; each line written "name: value".
    assert lines[1:5] == [
        b"X-Odd: caf\xe9",
        b"x-lower-case: Mixed  Value",
        b"X-Utf8: \xe2\x82\xac",
        b"X-Empty: ",
    ]
    # No Content-Type the upstream never sent, and the framing is the proxy's own.
    assert not [line for line in lines if line.lower().startswith(b"content-type:")]
    if framing == "chunked":
        assert b"Transfer-Encoding: chunked" in lines
        assert dechunk(rest) == body
    else:
        assert b"Content-Length: %d" % len(body) in lines
        assert rest == body
    assert b"X-Request-Id" in b"\r\n".join(line.split(b":")[0] for line in lines)


async def test_the_upstream_content_type_is_relayed_once_and_exact(raw_server, start_proxy, canary_env):
    async def typed(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(
                b"HTTP/1.1 200 OK\r\ncontent-type: Application/JSON;charset=UTF-8\r\n"
                b"Content-Length: 2\r\n\r\n{}"
            )

    upstream = await raw_server(typed)
    proxy = await start_proxy(env_config(upstream.url))
    head, rest = await raw_exchange(proxy.url, get(proxy.url))
    assert [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-type:")] == [
        b"content-type: Application/JSON;charset=UTF-8"
    ]
    assert rest == b"{}"


@pytest.mark.parametrize("one_read", [True, False], ids=["one-read", "body-later"])
async def test_trailers_never_reach_the_client_as_headers(one_read, raw_server, start_proxy, canary_env):
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Head: yes\r\n\r\n"
    body = b"5\r\nhello\r\n0\r\nLocation: /evil\r\nContent-Encoding: gzip\r\nX-Trailer: t\r\n\r\n"

    async def trailing(peer: Peer) -> None:
        while await peer.request() is not None:
            if one_read:
                await peer.send(head + body)
            else:
                await peer.send(head)
                await peer.send(body)

    upstream = await raw_server(trailing)
    proxy = await start_proxy(env_config(upstream.url))
    got_head, rest = await raw_exchange(proxy.url, get(proxy.url))
    assert b"\r\nX-Head: yes" in got_head
    for trailer in (b"Location", b"Content-Encoding", b"X-Trailer"):
        assert trailer.lower() not in got_head.lower()
    assert dechunk(rest) == b"hello"
    assert b"/evil" not in rest


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_cut_short_resets_an_http10_client(framing, raw_server, start_proxy, canary_env):
    async def cut(peer: Peer) -> None:
        if await peer.request() is None:
            return
        piece = b"x" * 100_000
        if framing == "chunked":
            await peer.send(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(piece), piece)
            )
        else:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + piece)
        # and the close, with the body unfinished

    upstream = await raw_server(cut)
    proxy = await start_proxy(env_config(upstream.url))
    target = URL(proxy.url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    received = bytearray()
    try:
        writer.write(get(proxy.url, "/v1/files/x", b"1.0"))
        # An HTTP/1.0 answer without a length ends where the connection does: only a
        # reset, never a clean end of stream, tells this client its answer was cut.
        with pytest.raises(ConnectionResetError):
            while chunk := await asyncio.wait_for(reader.read(65_536), TIMEOUT):
                received += chunk
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert received == b"" or received.startswith(b"HTTP/1.0 200 OK\r\n")
    assert len(received) < 1_000_000


async def test_an_http10_upstream_answer_is_relayed_with_its_status(raw_server, start_proxy, canary_env):
    async def old(peer: Peer) -> None:
        while (seen := await peer.request()) is not None:
            body = seen.target.encode()
            await peer.send(
                b"HTTP/1.0 404 Not Found\r\nConnection: keep-alive\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )

    upstream = await raw_server(old)
    proxy = await start_proxy(env_config(upstream.url))
    for n in (1, 2):
        head, rest = await raw_exchange(proxy.url, get(proxy.url, f"/v1/old/{n}"))
        assert head.startswith(b"HTTP/1.1 404 Not Found\r\n")
        assert rest == f"/v1/old/{n}".encode()  # searched whole, so its length holds
        await upstream.wait_eof(n)  # never kept for another request
    assert [s.connection for s in upstream.seen] == [1, 2]


async def test_the_key_never_leaves_in_a_reason_or_a_header(raw_server, start_proxy, canary_env):
    key = CANARY.encode()

    async def echoing(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(
                b"HTTP/1.1 200 bad key %s\r\nX-Seen: %s\r\nContent-Length: 2\r\n\r\n{}" % (key, key)
            )

    upstream = await raw_server(echoing)
    proxy = await start_proxy(env_config(upstream.url))
    head, rest = await raw_exchange(proxy.url, get(proxy.url))
    assert head.startswith(b"HTTP/1.1 200 bad key ")
    assert_no_canary(head.decode("latin-1"), rest.decode("latin-1"))
