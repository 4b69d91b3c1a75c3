"""A deadline does not fail an exchange whose bytes arrived while the proxy's loop was held up.

On a loop held up past a deadline (overload, a long callback), timers and callbacks
already queued run before the loop reads its sockets again, so the deadline's sweep
can come round while the client's next bytes, sent in time, still sit unread. The
stall is made with a clock that stops and then jumps rather than with a wait, so the
order of events is the same on any machine: the bytes reach the proxy's socket in the
loop turn in which the sweep's timer comes due, and are read only after the sweep.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from helpers import env_config
from helpers.daemon import eventually
from helpers.http import RawResponse, assert_error, host_of, http_head, read_response
from yarl import URL

from skyproxy.proxy.deadlines import RESOLUTION

IDLE = 30.0  # never reached in real time: only the jump gets past it


class JumpingClock:
    """`loop.time` that runs with the real clock, can stop, and then jumps forward: a
    stall of the loop without waiting for it. While it is stopped no timer comes due."""

    def __init__(self, real: Callable[[], float]) -> None:
        self.real = real
        self.offset = 0.0
        self.stopped: float | None = None

    def __call__(self) -> float:
        return self.stopped if self.stopped is not None else self.real() + self.offset

    def stop(self) -> float:
        self.stopped = self()
        return self.stopped

    def jump(self, seconds: float) -> None:
        """Runs on from `seconds` after the time it stopped at."""
        assert self.stopped is not None
        self.offset = self.stopped + seconds - self.real()
        self.stopped = None


class Upload:
    """A chunked upload through a real proxy to a real upstream, on a loop whose clock
    the test stops and jumps."""

    def __init__(self, clock: JumpingClock, reader: asyncio.StreamReader, sock: socket.socket) -> None:
        self.clock = clock
        self.reader = reader
        self.sock = sock

    async def stall(self, sending: bytes | None) -> None:
        """The loop held up past idle_timeout; `sending` reaches the proxy's socket during
        the stall, well before the deadline. Stopped, the sweep runs out whatever it had
        queued and waits on a timer that cannot come due; then the clock jumps, so that
        timer and the one writing `sending` come due in the same turn: the sweep is queued
        before the loop next reads its sockets."""
        loop = asyncio.get_running_loop()
        stopped = self.clock.stop()
        for _ in range(5):
            await asyncio.sleep(0)
        if sending is not None:
            loop.call_at(stopped + 2 * RESOLUTION, self.sock.send, sending)
        self.clock.jump(IDLE + 1.0)

    async def answer(self) -> RawResponse:
        return await asyncio.wait_for(read_response(self.reader), 10)


def echo_app(pieces: list[bytes]) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        async for piece in request.content.iter_any():
            pieces.append(piece)
        return web.json_response({"body": b"".join(pieces).decode()})

    app = web.Application()
    app.router.add_post("/v1/upload", echo)
    return app


@pytest.fixture
async def upload(
    monkeypatch, raw_upstream, start_proxy, canary_env
) -> AsyncIterator[tuple[Upload, list[bytes]]]:
    """An upload whose first piece has reached the upstream; the pieces the upstream got."""
    loop = asyncio.get_running_loop()
    clock = JumpingClock(loop.time)
    monkeypatch.setattr(loop, "time", clock)  # before the proxy arms any deadline on it
    pieces: list[bytes] = []
    upstream = await raw_upstream(echo_app(pieces))
    proxy = await start_proxy(
        env_config(upstream, server=f"upstream_timeout = {IDLE * 2}\nidle_timeout = {IDLE}")
    )
    target = URL(proxy.url)
    assert target.host is not None and target.port is not None
    # A socket the test also writes to directly, at an exact turn of the loop.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, (target.host, target.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        head = [("Host", host_of(proxy.url)), ("Transfer-Encoding", "chunked"), ("X-User-Id", "alice")]
        writer.write(http_head("POST", "/v1/upload", head) + b"5\r\nhello\r\n")
        await writer.drain()
        await eventually(lambda: pieces == [b"hello"], "the first piece reached the upstream")
        yield Upload(clock, reader, sock), pieces
    finally:
        writer.close()


async def test_a_body_that_arrived_during_a_stall_is_not_408(upload):
    client, _ = upload
    await client.stall(sending=b"5\r\nworld\r\n0\r\n\r\n")
    answer = await client.answer()
    assert answer.status == 200, answer.body
    assert answer.json() == {"body": "helloworld"}  # all of it, on to the upstream


async def test_a_body_still_missing_after_a_stall_is_408(upload):
    client, pieces = upload
    await client.stall(sending=None)
    assert_error(408, "body_timeout", await client.answer())
    assert pieces == [b"hello"]


async def test_a_client_spared_by_a_stall_is_still_cut_when_it_goes_silent(upload):
    client, pieces = upload
    await client.stall(sending=b"5\r\nworld\r\n")  # in time; then nothing more
    await eventually(lambda: b"".join(pieces) == b"helloworld", "the second piece reached the upstream")
    await client.stall(sending=None)
    assert_error(408, "body_timeout", await client.answer())
