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
from collections.abc import Callable

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


async def turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def echo_app(first_in: asyncio.Event) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        first = await request.content.readany()
        first_in.set()
        rest = await request.read()
        return web.json_response({"body": (first + rest).decode()})

    app = web.Application()
    app.router.add_post("/v1/upload", echo)
    return app


async def open_socket(url: str) -> tuple[socket.socket, asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose socket the test can also write to directly, at an exact turn."""
    target = URL(url)
    assert target.host is not None and target.port is not None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (target.host, target.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    return sock, reader, writer


async def upload_across_a_stall(
    monkeypatch: pytest.MonkeyPatch, raw_upstream, start_proxy, rest_in_time: bool
) -> RawResponse:
    """A chunked upload whose first piece flows; then the loop stalls past idle_timeout,
    and the rest reaches the proxy's socket during the stall (`rest_in_time`) or never."""
    loop = asyncio.get_running_loop()
    clock = JumpingClock(loop.time)
    monkeypatch.setattr(loop, "time", clock)  # before the proxy arms any deadline on it
    first_in = asyncio.Event()
    upstream = await raw_upstream(echo_app(first_in))
    server = f"upstream_timeout = {IDLE * 2}\nidle_timeout = {IDLE}"
    proxy = await start_proxy(env_config(upstream, server=server))
    sock, reader, writer = await open_socket(proxy.url)
    try:
        head = [("Host", host_of(proxy.url)), ("Transfer-Encoding", "chunked"), ("X-User-Id", "alice")]
        writer.write(http_head("POST", "/v1/upload", head) + b"5\r\nhello\r\n")
        await writer.drain()
        await eventually(first_in.is_set, "the first piece reached the upstream")
        # Stopped, the sweep runs out whatever it had queued and waits on a timer that
        # cannot come due; then the clock jumps past the deadline, so that timer and the
        # one writing the rest (due well before the deadline) run in the same turn.
        stopped = clock.stop()
        await turns(5)
        if rest_in_time:
            loop.call_at(stopped + 2 * RESOLUTION, sock.send, b"5\r\nworld\r\n0\r\n\r\n")
        clock.jump(IDLE + 1.0)
        return await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()


async def test_a_body_that_arrived_during_a_stall_is_not_408(
    monkeypatch, raw_upstream, start_proxy, canary_env
):
    answer = await upload_across_a_stall(monkeypatch, raw_upstream, start_proxy, rest_in_time=True)
    assert answer.status == 200, answer.body
    assert answer.json() == {"body": "helloworld"}  # all of it, on to the upstream


async def test_a_body_still_missing_after_a_stall_is_408(monkeypatch, raw_upstream, start_proxy, canary_env):
    answer = await upload_across_a_stall(monkeypatch, raw_upstream, start_proxy, rest_in_time=False)
    assert_error(408, "body_timeout", answer)
