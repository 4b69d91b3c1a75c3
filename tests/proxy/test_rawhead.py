"""The aiohttp adapter: the privates it hooks still behave, and its heads are byte-exact.

If aiohttp renames or changes `StreamResponse._write_headers` or the head it buffers in
`StreamWriter._headers_buf`, the first tests here fail by name, before any relay does.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import StreamWriter
from helpers.raw_upstream import TIMEOUT
from multidict import CIMultiDict

from skyproxy.proxy.rawhead import RawHeadResponse, UnsafeHead

# -- the privates the adapter relies on ---------------------------------------------------------


def test_stream_response_still_writes_its_head_in_write_headers():
    hook = getattr(web.StreamResponse, "_write_headers", None)
    assert hook is not None, "aiohttp removed StreamResponse._write_headers: rework rawhead.py"
    assert inspect.iscoroutinefunction(hook)
    assert inspect.signature(hook).parameters.keys() == {"self"}
    assert "_write_headers" in inspect.getsource(web.StreamResponse._start)


async def test_stream_writer_still_buffers_the_head_in_headers_buf():
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    transport, protocol = await loop.connect_accepted_socket(lambda: BaseProtocol(loop), ours)
    try:
        writer = StreamWriter(protocol, loop)
        await writer.write_headers("HTTP/1.1 200 OK", CIMultiDict({"X-A": "b"}))
        assert writer._headers_buf == b"HTTP/1.1 200 OK\r\nX-A: b\r\n\r\n", "rework rawhead.py"
        writer._headers_buf = b"HTTP/1.1 200 OK\r\nX-Raw: \xe9\r\n\r\n"
        await writer.write_eof(b"body")  # the head goes out with the body, as replaced
        expected = b"HTTP/1.1 200 OK\r\nX-Raw: \xe9\r\n\r\nbody"
        got = b""
        while len(got) < len(expected):
            got += await asyncio.wait_for(loop.sock_recv(theirs, 1024), TIMEOUT)
        assert got == expected
    finally:
        transport.close()
        theirs.close()


# -- what the adapter sends, byte for byte ---------------------------------------------------------

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    runners: list[web.ServerRunner] = []

    async def start(handler: Handler) -> int:
        runner = web.ServerRunner(web.Server(handler), handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return int(runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


async def raw_get(port: int, version: bytes = b"1.1") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/%s\r\nHost: x\r\nConnection: close\r\n\r\n" % version)
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


LINES = b"X-Odd: caf\xe9\r\nx-lower: Mixed Case\r\nX-Odd: again\r\n"


@pytest.mark.parametrize("at_once", [True, False])
async def test_lines_and_reason_go_out_exactly(at_once, serve):
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        response = RawHeadResponse(201, b"Cr\xe9\xe9", LINES, 3, at_once=at_once)
        response.headers["X-Proxy"] = "own"
        response.content_length = 2
        await response.prepare(request)
        await response.write_eof(b"{}")
        return response

    raw = await raw_get(await serve(handler))
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 201 Cr\xe9\xe9"
    assert lines[1:4] == LINES.rstrip(b"\r\n").split(b"\r\n")  # in order, right after the status
    assert b"X-Proxy: own" in lines
    assert b"Content-Length: 2" in lines
    assert not [line for line in lines if line.lower().startswith(b"content-type")]
    assert body == b"{}"


async def test_date_server_and_content_type_come_from_the_lines_when_they_hold_them(serve):
    lines = b"Content-Type: text/plain\r\nDate: Mon, 01 Jan 2025 00:00:00 GMT\r\nServer: upstream\r\n"

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        response = RawHeadResponse(200, b"", lines, 3)
        await response.prepare(request)
        await response.write_eof(b"x")
        return response

    head = (await raw_get(await serve(handler))).partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200 ok\r\n")  # no reason given: aiohttp's phrase
    assert head.count(b"\r\ncontent-type:") == head.count(b"\r\ndate:") == head.count(b"\r\nserver:") == 1
    assert b"\r\nserver: upstream" in head
    assert b"\r\ndate: mon, 01 jan 2025" in head


async def test_an_http10_client_gets_an_http10_status_line(serve):
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        response = RawHeadResponse(404, b"Gone Fishing", b"X-A: b\r\n", 1)
        await response.prepare(request)
        await response.write_eof(b"no")
        return response

    raw = await raw_get(await serve(handler), b"1.0")
    assert raw.startswith(b"HTTP/1.0 404 Gone Fishing\r\nX-A: b\r\n")
    assert raw.endswith(b"\r\n\r\nno")


@pytest.mark.parametrize(
    ("reason", "lines", "count"),
    [
        (b"OK", b"X-A: b\r\nInjected: yes\r\n", 1),
        (b"OK", b"X-A: b\nInjected: yes\r\n", 1),
        (b"OK", b"X-A: b\rInjected: yes\r\n", 1),
        (b"OK", b"X-A: \x00\r\n", 1),
        (b"OK", b"X-A: \x7f\r\n", 1),
        (b"OK", b"X-A: b", 1),
        (b"OK\r\nInjected: yes", b"", 0),
        (b"O\nK", b"", 0),
    ],
)
def test_control_characters_never_reach_a_head(reason, lines, count):
    with pytest.raises(UnsafeHead):
        RawHeadResponse(200, reason, lines, count)


def test_tabs_and_obs_text_are_fine():
    RawHeadResponse(200, b"O\tK \xff", b"X-A: a\tb \x80\xff\r\n", 1)
