"""Links moved on answers that are not a small identity body: coded, chunked, long, streamed.

Raw socket upstreams send each framing byte for byte; the client reads what the proxy
relays. A JSON prediction answer comes back with its links on the proxy, decoded, and
with the key masked; one over the bound, an event stream, or an answer off the
prediction paths keeps its links as the upstream wrote them.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import Callable

import brotli
import pytest
from helpers import CANARY, assert_no_canary, env_config
from helpers.http import assert_error, host_of, http_head, raw_request
from helpers.raw_upstream import TIMEOUT, Peer
from yarl import URL

from skyproxy.proxy import links

CODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "gzip, br": lambda body: brotli.compress(gzip.compress(body)),
}


def prediction(origin: str, pid: str = "p1", logs: str = "") -> bytes:
    return json.dumps(
        {
            "id": pid,
            "status": "processing",
            "logs": logs or f"echoed {CANARY}",  # an upstream that echoes the key
            "urls": {
                "get": f"{origin}/v1/predictions/{pid}",
                "cancel": f"{origin}/v1/predictions/{pid}/cancel",
                "stream": f"{origin}/v1/predictions/{pid}/stream",
            },
        }
    ).encode()


def chunked(body: bytes, piece: int = 1000) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in _parts(body, piece))
    return out + b"0\r\n\r\n"


def _parts(body: bytes, piece: int) -> list[bytes]:
    return [body[at : at + piece] for at in range(0, len(body), piece)]


def answering(head: bytes, body: bytes) -> Callable[[Peer], object]:
    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(head + body)

    return script


def get(proxy_url: str, target: str = "/v1/predictions/p1") -> bytes:
    return http_head("GET", target, [("Host", host_of(proxy_url)), ("Connection", "close")])


def links_of(body: bytes) -> dict[str, str]:
    urls = json.loads(body)["urls"]
    assert isinstance(urls, dict)
    return urls


def on(origin: str, pid: str = "p1") -> dict[str, str]:
    return {
        "get": f"{origin}/v1/predictions/{pid}",
        "cancel": f"{origin}/v1/predictions/{pid}/cancel",
        "stream": f"{origin}/v1/predictions/{pid}/stream",
    }


@pytest.mark.parametrize("coding", list(CODERS))
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_coded_prediction_answer_comes_back_decoded_with_its_links_moved(
    coding, framing, raw_server, start_proxy, canary_env
):
    origin: list[str] = []

    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            body = CODERS[coding](prediction(origin[0]))
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: %s\r\n" % (
                coding.encode()
            )
            if framing == "chunked":
                await peer.send(head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, 7))
            else:
                await peer.send(head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    upstream = await raw_server(script)
    origin.append(upstream.url)
    proxy = await start_proxy(env_config(upstream.url))
    answer = await raw_request(proxy.url, get(proxy.url))
    assert answer.status == 200
    assert "Content-Encoding" not in answer.headers
    assert int(answer.headers["Content-Length"]) == len(answer.body)  # sent whole, not chunked
    assert links_of(answer.body) == on(proxy.url)
    assert upstream.url.encode() not in answer.body
    assert_no_canary(answer.body, answer.headers)


@pytest.mark.parametrize("size", [10_000, 300_000])
async def test_a_chunked_prediction_answer_has_its_links_moved(size, raw_server, start_proxy, canary_env):
    origin: list[str] = []

    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            body = prediction(origin[0], logs="x" * size)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
            await peer.send(head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, 4096))

    upstream = await raw_server(script)
    origin.append(upstream.url)
    proxy = await start_proxy(env_config(upstream.url))
    answer = await raw_request(proxy.url, get(proxy.url))
    assert answer.status == 200
    assert int(answer.headers["Content-Length"]) == len(answer.body)
    assert links_of(answer.body) == on(proxy.url)
    assert json.loads(answer.body)["logs"] == "x" * size


async def test_a_long_answer_of_known_length_within_the_bound_has_its_links_moved(
    raw_server, start_proxy, canary_env
):
    origin: list[str] = []

    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            body = prediction(origin[0], logs="y" * 200_000)  # past the small body read whole
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            await peer.send(head % len(body) + body)

    upstream = await raw_server(script)
    origin.append(upstream.url)
    proxy = await start_proxy(env_config(upstream.url))
    answer = await raw_request(proxy.url, get(proxy.url))
    assert answer.status == 200
    assert links_of(answer.body) == on(proxy.url)


@pytest.mark.parametrize("coding", ["identity", "gzip"])
async def test_past_the_bound_an_answer_streams_on_whole_with_its_links_as_they_were(
    coding, raw_server, start_proxy, canary_env
):
    origin: list[str] = []

    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            body = prediction(origin[0], logs=CANARY + "z" * links.MAX_BODY)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            if coding == "gzip":
                body = gzip.compress(body)
                head += b"Content-Encoding: gzip\r\n"
            await peer.send(head + b"\r\n" + chunked(body, 65_536))

    upstream = await raw_server(script)
    origin.append(upstream.url)
    proxy = await start_proxy(env_config(upstream.url))
    answer = await raw_request(proxy.url, get(proxy.url))
    assert answer.status == 200
    assert "Content-Length" not in answer.headers  # streamed on, not held whole
    document = json.loads(answer.body)  # every byte arrived, decoded
    assert document["logs"].endswith("z" * links.MAX_BODY)
    assert links_of(answer.body) == on(upstream.url)  # unrewritten, as documented
    assert_no_canary(answer.body)


async def test_an_event_stream_on_a_prediction_path_is_not_held_back(raw_server, start_proxy, canary_env):
    origin: list[str] = []
    first_seen = asyncio.Event()
    event = b'data: {"urls":{"get":"%s/v1/predictions/p1"}}\n\n'

    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            one = event % origin[0].encode()
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            await peer.send(head + b"%x\r\n%s\r\n" % (len(one), one))
            await asyncio.wait_for(first_seen.wait(), TIMEOUT)  # the end only once the client has it
            await peer.send(b"0\r\n\r\n")

    upstream = await raw_server(script)
    origin.append(upstream.url)
    proxy = await start_proxy(env_config(upstream.url))
    target = URL(proxy.url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        writer.write(get(proxy.url, "/v1/predictions/p1/stream"))
        received = b""
        while b"\n\n" not in received:
            data = await asyncio.wait_for(reader.read(65_536), TIMEOUT)
            assert data, "the stream ended before its first event arrived"
            received += data
        first_seen.set()
        received += await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
    assert (event % upstream.url.encode()) in received  # an event stream's links stay as sent


async def test_answers_off_the_prediction_paths_keep_their_links(raw_server, start_proxy, canary_env):
    origin: list[str] = []

    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            body = gzip.compress(prediction(origin[0]))
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            await peer.send(head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body))

    upstream = await raw_server(script)
    origin.append(upstream.url)
    proxy = await start_proxy(env_config(upstream.url))
    answer = await raw_request(proxy.url, get(proxy.url, "/v1/models"))
    assert answer.status == 200
    assert links_of(answer.body) == on(upstream.url)
    assert_no_canary(answer.body)


async def test_a_prediction_answer_that_is_not_what_its_coding_says_is_a_clean_502(
    raw_server, start_proxy, canary_env
):
    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            body = b"not gzip at all"
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            await peer.send(head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body))

    upstream = await raw_server(script)
    proxy = await start_proxy(env_config(upstream.url))
    answer = await raw_request(proxy.url, get(proxy.url))
    assert_error(502, "upstream_undecodable", answer)


async def test_a_coded_answer_s_location_is_moved_too(raw_server, start_proxy, canary_env):
    origin: list[str] = []

    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            body = gzip.compress(prediction(origin[0]))
            head = (
                b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                b"Location: %s/v1/predictions/p1\r\nContent-Length: %d\r\n\r\n"
            ) % (origin[0].encode(), len(body))
            await peer.send(head + body)

    upstream = await raw_server(script)
    origin.append(upstream.url)
    proxy = await start_proxy(env_config(upstream.url))
    request = http_head(
        "POST",
        "/v1/predictions",
        [
            ("Host", host_of(proxy.url)),
            ("Connection", "close"),
            ("X-User-Id", "alice"),
            ("Content-Length", "2"),
        ],
    )
    answer = await raw_request(proxy.url, request + b"{}")
    assert answer.status == 201
    assert answer.headers["Location"] == f"{proxy.url}/v1/predictions/p1"
    assert links_of(answer.body) == on(proxy.url)
