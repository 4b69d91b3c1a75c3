"""Client connections cannot starve the daemon: head deadline, keep-alive expiry, the cap, fds.

Raw sockets play the slow and silent clients; the proxy is real, in process or as a
`skyproxy serve` subprocess with a real RLIMIT_NOFILE.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from helpers import CANARY, env_config, free_port, skyproxy_command, write_config
from helpers.access import all_logs
from helpers.daemon import eventually

from skyproxy.daemon import fds

HEAD = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-User-Id: alice\r\n\r\n"
LIMITS = "header_timeout = {header}\nkeepalive_timeout = {keepalive}\nmax_connections = {cap}\n"


def server_limits(header: float = 10, keepalive: float = 30, cap: int = 10_000) -> str:
    return LIMITS.format(header=header, keepalive=keepalive, cap=cap)


async def read_until_closed(reader: asyncio.StreamReader, deadline_s: float = 15.0) -> bytes:
    return await asyncio.wait_for(reader.read(), deadline_s)


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def test_a_head_that_never_completes_gets_408_and_is_closed(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, server=server_limits(header=0.3)))
    reader, writer = await open_raw(proxy.url)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")  # and never the rest
    answer = await read_until_closed(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "header_timeout"
    assert proxy.state.metrics.clients_closed == {(proxy.url.removeprefix("http://"), "header_timeout"): 1}


async def test_a_silent_connection_is_closed_too(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, server=server_limits(header=0.3)))
    reader, writer = await open_raw(proxy.url)
    answer = await read_until_closed(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer


async def test_the_head_deadline_does_not_cut_a_slow_answer(raw_upstream, start_proxy, canary_env):
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)  # longer than header_timeout: the head arrived long before
        return web.json_response({"data": []})

    app = web.Application()
    app.router.add_get("/v1/models", slow)
    proxy = await start_proxy(env_config(await raw_upstream(app), server=server_limits(header=0.3)))
    async with proxy.session.get(f"{proxy.url}/v1/models") as r:
        assert r.status == 200
        assert await r.json() == {"data": []}


async def test_an_idle_keepalive_connection_is_closed(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, server=server_limits(keepalive=0.3)))
    reader, writer = await open_raw(proxy.url)
    writer.write(HEAD)
    status = await asyncio.wait_for(reader.readline(), 10)
    assert status.startswith(b"HTTP/1.1 200 ")
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")  # a second head, trickled
    rest = await read_until_closed(reader)
    writer.close()
    assert rest.count(b"HTTP/1.1 ") == 0  # the first answer's remainder only, then the close


async def test_when_full_the_longest_waiting_slow_head_is_shed(mock_upstream, start_proxy, canary_env):
    url, _ = mock_upstream
    proxy = await start_proxy(env_config(url, server=server_limits(cap=3)))
    slow = [await open_raw(proxy.url) for _ in range(3)]
    for _, writer in slow:
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    await eventually(lambda: sum(proxy.server.client_connections().values()) == 3, "3 open")
    async with proxy.session.get(f"{proxy.url}/v1/models", headers={"X-User-Id": "alice"}) as r:
        assert r.status == 200
    oldest = await read_until_closed(slow[0][0])
    assert oldest.startswith(b"HTTP/1.1 503 "), oldest
    assert json.loads(oldest.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "connection_shed"
    assert (proxy.url.removeprefix("http://"), "shed") in proxy.state.metrics.clients_closed
    for _, writer in slow:
        writer.close()


def counting_upstream() -> tuple[web.Application, list[int]]:
    arrived: list[int] = []

    async def create(request: web.Request) -> web.Response:
        arrived.append(1)
        return web.json_response({"id": "p1", "status": "starting"}, status=201)

    app = web.Application()
    app.router.add_post("/v1/predictions", create)
    return app, arrived


CREATE_BODY = b'{"model": "truefusion-pro", "input": {"prompt": "x"}}'
CREATE_REQUEST = (
    b"POST /v1/predictions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-User-Id: alice\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(CREATE_BODY), CREATE_BODY)
)


async def test_a_head_due_with_its_deadline_is_served(raw_upstream, start_proxy, canary_env):
    """The loop stood still while the head arrived and its deadline passed: both are due in
    one turn. The head came in time, so it is served, not refused for the loop's delay."""
    app, arrived = counting_upstream()
    proxy = await start_proxy(env_config(await raw_upstream(app), server=server_limits(header=0.2)))
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    client = socket.create_connection((host, int(port)))
    try:
        await eventually(lambda: sum(proxy.server.client_connections().values()) == 1, "accepted")
        client.sendall(CREATE_REQUEST)
        time.sleep(0.5)  # in the loop's own thread: the bytes and the deadline are due together
        client.settimeout(15)
        answer = await asyncio.to_thread(client.recv, 65536)
    finally:
        client.close()
    assert answer.startswith(b"HTTP/1.1 201 "), answer
    assert arrived == [1]


async def test_a_shed_connection_never_has_its_request_forwarded(tmp_path: Path, raw_upstream):
    """uvloop, a real daemon held by SIGSTOP: a full request on the one connection allowed
    and a newcomer arrive together. When the newcomer sheds it after its head was parsed,
    that client is told 503, so its create must not reach the upstream, where it is billed.
    Which of the two the loop takes first varies, so trials run until one such shed."""
    app, arrived = counting_upstream()
    upstream = await raw_upstream(app)
    port = free_port()
    body = env_config(upstream, listen=f"127.0.0.1:{port}", server=server_limits(cap=1))
    process = _spawn_limited(tmp_path, body, port, 4096, 4096)
    served = dropped = 0
    try:
        for _ in range(60):
            answer = await _create_beside_a_newcomer(process.pid, port)
            served += answer.startswith(b"HTTP/1.1 201 ")
            dropped = await _dropped_requests(port)
            if dropped:
                assert answer.startswith(b"HTTP/1.1 503 "), answer
                code = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"]
                assert code == "connection_shed"
                break
        await asyncio.sleep(0.5)  # a forwarded create would have reached the upstream by now
    finally:
        os.kill(process.pid, signal.SIGCONT)
        process.kill()
        process.wait(10)
    assert dropped == 1, "no trial shed a connection whose request had been parsed already"
    assert len(arrived) == served  # every create at the upstream is one its client was told of


async def _create_beside_a_newcomer(pid: int, port: int) -> bytes:
    first = socket.create_connection(("127.0.0.1", port))
    newcomer: socket.socket | None = None
    try:
        client_port = first.getsockname()[1]
        await eventually(lambda: _holds(pid, client_port), "the daemon accepted the connection")
        os.kill(pid, signal.SIGSTOP)
        try:
            first.sendall(CREATE_REQUEST)
            newcomer = socket.create_connection(("127.0.0.1", port))  # the kernel accepts it meanwhile
        finally:
            os.kill(pid, signal.SIGCONT)
        first.settimeout(15)
        return await asyncio.to_thread(first.recv, 65536)
    finally:
        first.close()
        if newcomer is not None:
            newcomer.close()


async def _dropped_requests(port: int) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/-/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if (
            line.startswith("skyproxy_client_connections_closed_total{")
            and 'reason="request_dropped"' in line
        ):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


async def test_when_every_connection_is_busy_a_newcomer_gets_503(raw_upstream, start_proxy, canary_env):
    release = asyncio.Event()
    arrived = 0

    async def held(request: web.Request) -> web.Response:
        nonlocal arrived
        arrived += 1
        await release.wait()
        return web.json_response({"data": []})

    app = web.Application()
    app.router.add_get("/v1/models", held)
    proxy = await start_proxy(env_config(await raw_upstream(app), server=server_limits(cap=2)))
    busy = [
        asyncio.create_task(proxy.session.get(f"{proxy.url}/v1/models", headers={"X-User-Id": u}))
        for u in ("a", "b")
    ]
    await eventually(lambda: arrived == 2, "both busy requests at the upstream")
    with all_logs() as records:
        reader, writer = await open_raw(proxy.url)
        try:
            answer = await read_until_closed(reader)
        finally:
            writer.close()
            release.set()
            for response in await asyncio.gather(*busy):
                response.release()
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
    assert b"Retry-After: 1\r\n" in answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"
    assert any("is full" in r.getMessage() for r in records)


# -- descriptors -----------------------------------------------------------------------------


def _limit_nofile(soft: int, hard: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _spawn_limited(tmp_path: Path, body: str, port: int, soft: int, hard: int) -> subprocess.Popen[bytes]:
    path = write_config(tmp_path, body)
    env = {"PATH": "/usr/bin:/bin", "SKYPROXY_TEST_KEY": CANARY, "HOME": str(tmp_path)}
    with (tmp_path / "stderr").open("wb") as stderr:
        process = subprocess.Popen(
            [*skyproxy_command(), "serve", "-c", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            preexec_fn=lambda: _limit_nofile(soft, hard),
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return process
        assert process.poll() is None, (tmp_path / "stderr").read_text()
        time.sleep(0.05)
    process.kill()
    raise AssertionError("daemon did not listen")


def _holds(pid: int, client_port: int) -> bool:
    """Whether process `pid` has accepted the loopback connection from `client_port`."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == client_port and fields[9] in inodes:
            return True
    return False


def _nofile_of(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit listed")


def test_serve_raises_the_soft_fd_limit_to_the_hard_one(tmp_path: Path) -> None:
    port = free_port()
    process = _spawn_limited(tmp_path, env_config("mock", listen=f"127.0.0.1:{port}"), port, 256, 2048)
    try:
        assert _nofile_of(process.pid) == (2048, 2048)
    finally:
        process.kill()
        process.wait(10)


async def test_slowloris_under_ulimit_1024_cannot_lock_out_a_real_request(tmp_path: Path) -> None:
    port = free_port()
    body = env_config("mock", listen=f"127.0.0.1:{port}")
    process = _spawn_limited(tmp_path, body, port, 1024, 1024)
    attackers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(1100):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                attackers.append(writer)
        for writer in attackers[::50]:
            with contextlib.suppress(ConnectionError):
                writer.write(b"a")  # still trickling
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{port}/v1/models",
                headers={"X-User-Id": "alice"},
                timeout=aiohttp.ClientTimeout(20),
            ) as r,
        ):
            assert r.status == 200
            assert (await r.json())["data"]
        assert process.poll() is None
        stderr = (tmp_path / "stderr").read_text()
        assert "max_connections lowered from 10000 to 480 per listener" in stderr
        assert CANARY not in stderr
    finally:
        for writer in attackers:
            writer.close()
        process.kill()
        process.wait(10)


def test_the_cap_halves_the_descriptors_left_after_the_reserve() -> None:
    soft = fds.soft_limit()
    assert fds.connection_cap(10**9, 1) == (soft - fds.RESERVE) // 2
    assert fds.connection_cap(10**9, 4) == (soft - fds.RESERVE) // 2 // 4
    assert fds.connection_cap(7, 1) == 7


async def test_running_low_on_descriptors_is_logged_once() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = fds.open_count()
    assert used is not None
    # Past 80% with room either side: a few descriptors closed by GC or opened by the
    # check itself (listdir holds one) move neither across its line.
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(used / 0.9) + 2, hard))
    # all_logs, not caplog: an earlier in-process daemon may have stopped propagation.
    with all_logs() as records:
        watcher = asyncio.create_task(fds.watch(interval=0.01))
        try:
            await eventually(lambda: any("running low" in r.getMessage() for r in records), "low-fd warning")
            await asyncio.sleep(0.05)  # several more checks
            assert sum("running low" in r.getMessage() for r in records) == 1
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
