"""The daemon as systemd runs it: a real `skyproxy serve` process, real signals.

The upstreams run in this test process, so every wait on the daemon happens off the
event loop (asyncio.to_thread) to keep them answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from helpers import (
    CANARY,
    VENV_BIN,
    Daemon,
    assert_no_canary,
    env_config,
    free_port,
    wait_healthy,
    write_config,
)
from helpers.daemon import Spawn, audit_lines, create, eventually, generation, status_of

from skyproxy.keys import nodump
from skyproxy.keys.secret import fingerprint
from skyproxy.mock.app import MockState

SKYPROXY = str(VENV_BIN / "skyproxy")
README = Path(__file__).resolve().parents[2] / "README.md"
NO_LIMITS = 'rate_limit = { per_user = "1000000/second", per_environment = "1000000/second" }'


# -- SIGTERM ---------------------------------------------------------------------------------


async def test_sigterm_lets_in_flight_requests_finish(
    tmp_path: Path, raw_upstream: Callable[[web.Application], object], spawn: Spawn
) -> None:
    n = 6
    arrived = 0
    all_arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        nonlocal arrived
        assert request.headers["x-api-key"] == CANARY
        arrived += 1
        if arrived == n:
            all_arrived.set()
        await asyncio.sleep(1.5)
        return web.json_response({"slow": True, "n": request.query["n"]})

    app = web.Application()
    app.router.add_get("/v1/slow", slow)
    upstream = await raw_upstream(app)  # type: ignore[misc]
    port = free_port()
    config = write_config(tmp_path, env_config(str(upstream), listen=f"127.0.0.1:{port}"))
    daemon = await asyncio.to_thread(spawn, config, port)

    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> tuple[int, object]:
            async with session.get(f"{daemon.url}/v1/slow?n={i}") as r:
                return r.status, await r.json()

        requests = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.wait_for(all_arrived.wait(), 20)
        daemon.signal(signal.SIGTERM)
        results = await asyncio.gather(*requests)
    assert results == [(200, {"slow": True, "n": str(i)}) for i in range(n)]
    code = await asyncio.to_thread(daemon.wait, 30)
    stderr = daemon.stderr()
    assert code == 0, stderr
    assert "draining" in stderr
    assert stderr.rstrip().endswith("skyproxy INFO stopped"), stderr  # the last word, once all is done
    assert_no_canary(stderr)
    with socket.socket() as s:  # the port is released
        assert s.connect_ex(("127.0.0.1", port)) != 0


async def test_sigterm_under_load_writes_every_accepted_audit_line(
    tmp_path: Path, mock_upstream: tuple[str, MockState], spawn: Spawn
) -> None:
    url, mock = mock_upstream
    port = free_port()
    config = write_config(tmp_path, env_config(url, listen=f"127.0.0.1:{port}", env_extra=NO_LIMITS))
    daemon = await asyncio.to_thread(spawn, config, port)
    received: list[str] = []
    statuses: list[int] = []
    terminated = asyncio.Event()

    async def worker(session: aiohttp.ClientSession, user: str) -> None:
        while True:
            try:
                status, body = await create(session, daemon.url, user)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                if terminated.is_set():
                    return
                raise
            statuses.append(status)
            if 200 <= status < 300:
                received.append(str(body["id"]))
            if terminated.is_set() and daemon.process.poll() is not None:
                return

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        workers = [asyncio.create_task(worker(session, f"user-{i}")) for i in range(12)]
        await eventually(lambda: len(received) >= 300 or any(w.done() for w in workers), "300 creates")
        daemon.signal(signal.SIGTERM)
        terminated.set()
        await asyncio.gather(*workers)
        code = await asyncio.to_thread(daemon.wait, 30)
    assert code == 0, daemon.stderr()
    assert set(statuses) == {201}, sorted(set(statuses))
    lines = [line for line in audit_lines(tmp_path / "audit" / "audit.jsonl") if line["status"] == "created"]
    on_disk = [str(line["predictionId"]) for line in lines]
    assert len(on_disk) == len(set(on_disk))
    assert set(received) <= set(on_disk), f"{len(set(received) - set(on_disk))} accepted lines missing"
    assert len(on_disk) == len(mock.predictions), "every create the upstream answered has its line"
    assert {line["keyFingerprint"] for line in lines} == {fingerprint(CANARY)}
    assert_no_canary((tmp_path / "audit" / "audit.jsonl").read_text(), daemon.stderr())


async def test_a_sigusr1_while_draining_still_only_reopens_the_audit_file(
    tmp_path: Path, raw_upstream: Callable[[web.Application], object], spawn: Spawn
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.json_response({"held": True})

    app = web.Application()
    app.router.add_get("/v1/held", held)
    upstream = await raw_upstream(app)  # type: ignore[misc]
    port = free_port()
    config = write_config(tmp_path, env_config(str(upstream), listen=f"127.0.0.1:{port}"))
    daemon = await asyncio.to_thread(spawn, config, port)
    async with aiohttp.ClientSession() as session:

        async def get() -> tuple[int, object]:
            async with session.get(f"{daemon.url}/v1/held") as r:
                return r.status, await r.json()

        request = asyncio.create_task(get())
        await asyncio.wait_for(arrived.wait(), 20)
        daemon.signal(signal.SIGTERM)
        await eventually(lambda: "draining" in daemon.stderr(), "the drain has begun")
        daemon.signal(signal.SIGUSR1)  # logrotate's, during a restart
        await eventually(
            lambda: "audit file reopened" in daemon.stderr() or daemon.process.poll() is not None,
            "the signal handled",
        )
        assert daemon.process.poll() is None, f"SIGUSR1 killed a draining daemon: {daemon.process.returncode}"
        release.set()
        assert await request == (200, {"held": True})
    assert await asyncio.to_thread(daemon.wait, 30) == 0
    assert daemon.stderr().rstrip().endswith("skyproxy INFO stopped")


# -- SIGHUP and SIGUSR1 ----------------------------------------------------------------------


async def test_sighup_reloads_the_config(
    tmp_path: Path, mock_upstream: tuple[str, MockState], spawn: Spawn
) -> None:
    url, _ = mock_upstream
    port = free_port()
    body = env_config(url, listen=f"127.0.0.1:{port}")
    config = write_config(tmp_path, body)
    daemon = await asyncio.to_thread(spawn, config, port)
    async with aiohttp.ClientSession() as session:
        before = await status_of(session, daemon)
        assert generation(before) == 1
        foreign = {"Host": "proxy.example.test"}
        async with session.get(f"{daemon.url}/v1/models", headers=foreign) as r:
            assert r.status == 403
            assert (await r.json())["error"]["code"] == "host_not_allowed"

        write_config(
            tmp_path, body.replace("[server]\n", '[server]\nallowed_hosts = ["proxy.example.test"]\n')
        )
        daemon.signal(signal.SIGHUP)

        async def reloaded() -> bool:
            return generation(await status_of(session, daemon)) == 2

        await eventually(reloaded, "generation 2 after SIGHUP")
        async with session.get(f"{daemon.url}/v1/models", headers=foreign) as r:
            assert r.status == 200

        # An invalid file on SIGHUP: the old generation keeps serving.
        write_config(tmp_path, body.replace('upstream = "', 'upstream = 5\nx = "'))
        daemon.signal(signal.SIGHUP)

        async def failed() -> object:
            return (await status_of(session, daemon))["config"]["last_reload_error"]  # type: ignore[index]

        await eventually(failed, "last_reload_error after a bad SIGHUP")
        status = await status_of(session, daemon)
        assert generation(status) == 2
        assert "environments.dev" in str(status["config"]["last_reload_error"])  # type: ignore[index]
        async with session.get(f"{daemon.url}/v1/models", headers=foreign) as r:
            assert r.status == 200
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait, 30) == 0


def ignored_signals(pid: int) -> int:
    """The process's mask of ignored signals, from /proc (0 until it is readable)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.MULTILINE)
    return int(found.group(1), 16) if found else 0


async def test_sigusr1_and_sighup_while_starting_do_not_end_the_daemon(
    tmp_path: Path, mock_upstream: tuple[str, MockState], spawn: Spawn
) -> None:
    """logrotate's SIGUSR1, or a reload, may come while the daemon is still importing and
    reading its config, before the event loop handles them: by default they would kill it."""
    url, _ = mock_upstream
    port = free_port()
    config = write_config(tmp_path, env_config(url, listen=f"127.0.0.1:{port}"))
    daemon = await asyncio.to_thread(spawn, config, port, None, False)
    pid = daemon.process.pid
    usr1 = 1 << (signal.SIGUSR1 - 1)
    # Sent as soon as the process says it ignores them: in the window before the loop's
    # handlers, where the default action would end it.
    await eventually(lambda: ignored_signals(pid) & usr1, "SIGUSR1 ignored from the start", deadline_s=20)
    daemon.signal(signal.SIGUSR1)
    daemon.signal(signal.SIGHUP)
    await asyncio.to_thread(wait_healthy, daemon)
    assert daemon.process.poll() is None
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait, 30) == 0


async def test_sigusr1_reopens_the_audit_file(
    tmp_path: Path, mock_upstream: tuple[str, MockState], spawn: Spawn
) -> None:
    url, _ = mock_upstream
    port = free_port()
    config = write_config(tmp_path, env_config(url, listen=f"127.0.0.1:{port}", env_extra=NO_LIMITS))
    daemon = await asyncio.to_thread(spawn, config, port)
    audit = tmp_path / "audit" / "audit.jsonl"
    rotated = tmp_path / "audit" / "audit.jsonl.1"
    ids: list[str] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            status, body = await create(session, daemon.url)
            assert status == 201
            ids.append(str(body["id"]))
        await eventually(lambda: len(audit_lines(audit)) == 3, "3 lines before the rename")
        os.rename(audit, rotated)

        # Still written to the renamed file: the writer holds its descriptor.
        status, body = await create(session, daemon.url)
        ids.append(str(body["id"]))
        await eventually(lambda: len(audit_lines(rotated)) == 4, "4th line in the renamed file")
        assert not audit.exists()

        daemon.signal(signal.SIGUSR1)

        async def lands_in_new_file() -> bool:
            status, body = await create(session, daemon.url)
            assert status == 201
            ids.append(str(body["id"]))
            await asyncio.sleep(0.05)
            return ids[-1] in {line["predictionId"] for line in audit_lines(audit)}

        await eventually(lands_in_new_file, "a new line in a new file at the configured path")
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait, 30) == 0
    old = [line["predictionId"] for line in audit_lines(rotated)]
    new = [line["predictionId"] for line in audit_lines(audit)]
    assert old[:4] == ids[:4]
    assert sorted(old + new) == sorted(ids), "every line is in exactly one of the two files"
    assert "audit file reopened" in daemon.stderr()


def readme_postrotate() -> str:
    """The command the README's logrotate example runs after a rotation."""
    found = re.search(r"\n *postrotate\n(.*?)\n *endscript\n", README.read_text(), re.S)
    assert found, "the README shows a logrotate config with a postrotate command"
    return textwrap.dedent(found.group(1)).strip()


async def test_the_readmes_logrotate_command_finds_a_venv_daemon(
    tmp_path: Path, mock_upstream: tuple[str, MockState]
) -> None:
    command = readme_postrotate()
    # Other skyproxy daemons may be running on this machine (other test runs), and a USR1
    # kills one still starting. So the real pkill runs confined to this daemon's session,
    # through a shim first on PATH; the command is otherwise run as written.
    assert command.split()[0] == "pkill", "the shim confines pkill only"
    real = shutil.which("pkill")
    assert real is not None, "procps is installed"
    url, _ = mock_upstream
    port = free_port()
    config = write_config(tmp_path, env_config(url, listen=f"127.0.0.1:{port}", env_extra=NO_LIMITS))
    env = {**os.environ, "SKYPROXY_TEST_KEY": CANARY}
    env.pop("NOTIFY_SOCKET", None)
    stderr_path = tmp_path / "daemon.stderr"
    with stderr_path.open("wb") as err:  # the venv's script, run by its python3
        process = subprocess.Popen(
            [SKYPROXY, "serve", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            start_new_session=True,
        )
    daemon = Daemon(process, f"http://127.0.0.1:{port}", config, stderr_path, env)
    shim = tmp_path / "bin" / "pkill"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec {real} --session {process.pid} "$@"\n')
    shim.chmod(0o755)
    audit = tmp_path / "audit" / "audit.jsonl"
    try:
        await asyncio.to_thread(wait_healthy, daemon)
        async with aiohttp.ClientSession() as session:
            assert (await create(session, daemon.url))[0] == 201
            await eventually(lambda: len(audit_lines(audit)) == 1, "the first line")
            os.rename(audit, tmp_path / "audit" / "audit.jsonl.1")

            # As logrotate runs it: the script text is an argument of sh.
            ran = await asyncio.to_thread(
                subprocess.run,
                ["sh", "-c", command],
                env={**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}"},
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert ran.returncode == 0, f"{command!r} found no skyproxy: {ran.stderr}"

            async def lands_in_new_file() -> bool:
                assert (await create(session, daemon.url))[0] == 201
                return audit.exists() and len(audit_lines(audit)) >= 1

            await eventually(lands_in_new_file, "a line in a new file at the configured path")
        assert "audit file reopened (SIGUSR1)" in daemon.stderr()
        daemon.signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


# -- the notify protocol ---------------------------------------------------------------------


@pytest.fixture
def notify_socket() -> Iterator[socket.socket]:
    folder = tempfile.mkdtemp(prefix="skyproxy-ns-")  # short: sun_path holds 108 bytes
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield sock
    sock.close()
    with contextlib.suppress(OSError):
        os.unlink(path)
        os.rmdir(folder)


def receive(sock: socket.socket, timeout: float = 20.0) -> dict[str, str]:
    sock.settimeout(timeout)
    fields = sock.recv(4096).decode().split("\n")
    return dict(field.split("=", 1) for field in fields)


async def test_notify_ready_reloading_stopping(
    tmp_path: Path, mock_upstream: tuple[str, MockState], spawn: Spawn, notify_socket: socket.socket
) -> None:
    url, _ = mock_upstream
    port = free_port()
    body = env_config(url, listen=f"127.0.0.1:{port}")
    config = write_config(tmp_path, body)
    address = notify_socket.getsockname()
    daemon = await asyncio.to_thread(spawn, config, port, {"NOTIFY_SOCKET": address}, False)

    ready = await asyncio.to_thread(receive, notify_socket)
    assert ready["READY"] == "1", ready
    assert "STATUS" in ready
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # bound before READY=1

    write_config(tmp_path, body.replace("[server]\n", '[server]\nallowed_hosts = ["x.example"]\n'))
    daemon.signal(signal.SIGHUP)
    reloading = await asyncio.to_thread(receive, notify_socket)
    assert reloading["RELOADING"] == "1", reloading
    assert int(reloading["MONOTONIC_USEC"]) > 0
    done = await asyncio.to_thread(receive, notify_socket)
    assert done == {"READY": "1"}
    async with aiohttp.ClientSession() as session:
        assert generation(await status_of(session, daemon)) == 2

    daemon.signal(signal.SIGTERM)
    stopping = await asyncio.to_thread(receive, notify_socket)
    assert stopping == {"STOPPING": "1"}
    assert await asyncio.to_thread(daemon.wait, 30) == 0
    notify_socket.settimeout(0.2)
    with pytest.raises(TimeoutError):
        notify_socket.recv(4096)  # nothing after STOPPING=1


async def test_sigint_also_stops_cleanly(
    tmp_path: Path, mock_upstream: tuple[str, MockState], spawn: Spawn
) -> None:
    url, _ = mock_upstream
    port = free_port()
    config = write_config(tmp_path, env_config(url, listen=f"127.0.0.1:{port}"))
    daemon = await asyncio.to_thread(spawn, config, port)
    daemon.signal(signal.SIGINT)
    assert await asyncio.to_thread(daemon.wait, 30) == 0
    assert "Traceback" not in daemon.stderr()


async def test_a_daemon_tunes_its_gc_and_an_embedded_server_does_not(tmp_path, canary_env):
    import gc

    from skyproxy import config
    from skyproxy.daemon.gc import GC_YOUNG_THRESHOLD
    from skyproxy.daemon.supervisor import Supervisor

    path = write_config(tmp_path, env_config("mock", listen="127.0.0.1:0"))
    thresholds = gc.get_threshold()
    gc.unfreeze()
    embedded = Supervisor(config.load(path))
    await embedded.start()
    try:
        # Tests and embedders keep their own GC.
        assert gc.get_freeze_count() == 0 and gc.get_threshold() == thresholds
    finally:
        await embedded.stop()
    daemon = Supervisor(config.load(path), own_process=True)
    await daemon.start()
    try:
        # What start() built (the runtime, the servers) is frozen, not walked by every
        # full collection, and young collections come less often.
        assert gc.get_freeze_count() > 10_000
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *thresholds[1:])
        assert nodump.dumpable() is False
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        # The rest of the suite runs in this process too, and expects it dumpable.
        ctypes.CDLL(None).prctl(nodump.PR_SET_DUMPABLE, 1, 0, 0, 0)
        await daemon.stop()
