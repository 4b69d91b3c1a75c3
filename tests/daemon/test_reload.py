"""Reload: the file watcher, POST /-/reload, listeners and environments coming and going,
and key rotation against a running daemon with the real keyring.

Config rewrites are real writes to the file start_proxy loaded; the watcher is the real
watchfiles one. Waits poll the live state with a deadline; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from helpers import CANARY, VENV_BIN, Proxy, assert_no_canary, free_port, write_config
from helpers.daemon import Spawn, audit_lines, create, eventually, status_of

from skyproxy.keys.secret import fingerprint
from skyproxy.keys.store import SERVICE
from skyproxy.mock.app import MOCK_STATE, MockState, create_mock_app

NO_LIMITS = 'rate_limit = { per_user = "1000000/second", per_environment = "1000000/second" }'
StartProxy = Callable[..., "asyncio.Future[Proxy]"]


def make_config(
    upstream: str,
    envs: dict[str, list[str]] | None = None,
    *,
    hosts: list[str] | None = None,
    watch: bool = True,
    server: str = "",
) -> str:
    """A config with one table per environment, each on its own listeners."""
    envs = envs if envs is not None else {"dev": ["127.0.0.1:0"]}
    text = (
        f"[server]\nwatch_config = {str(watch).lower()}\nshutdown_timeout = 5\n"
        f"allowed_hosts = {json.dumps(hosts or [])}\n{server}\n"
    )
    for name, listen in envs.items():
        text += (
            f'[environments.{name}]\nlisten = {json.dumps(listen)}\nupstream = "{upstream}"\n'
            f'key = "env:SKYPROXY_TEST_KEY"\n{NO_LIMITS}\n\n'
        )
    return text + '[audit]\npath = "audit/audit.jsonl"\n'


def replace_file(path: Path, text: str) -> None:
    """An editor's save: write a new file beside it, then rename it over the old one."""
    fd, tmp = tempfile.mkstemp(prefix=".skyproxy.toml.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def get_status(proxy: Proxy) -> dict[str, object]:
    async with proxy.session.get(f"{proxy.url}/-/status") as r:
        assert r.status == 200
        result: dict[str, object] = await r.json()
        return result


async def models(session: aiohttp.ClientSession, base: str, host: str | None = None) -> int:
    headers = {"Host": host} if host else {}
    async with session.get(f"{base}/v1/models", headers=headers) as r:
        await r.read()
        return r.status


# -- the watcher -----------------------------------------------------------------------------


async def test_invalid_rewrite_keeps_the_old_config_serving(
    mock_upstream: tuple[str, MockState], start_proxy: StartProxy, canary_env: str
) -> None:
    url, _ = mock_upstream
    good = make_config(url)
    proxy = await start_proxy(good)
    path = proxy.state.runtime.settings.path
    bad = good.replace('listen = ["127.0.0.1:0"]', 'listen = ["8787"]')
    line = bad.splitlines().index('listen = ["8787"]') + 1
    path.write_text(bad)

    await eventually(lambda: proxy.state.last_reload_error, "the watcher reports the bad file")
    status = await get_status(proxy)
    error = status["config"]["last_reload_error"]  # type: ignore[index]
    assert error == f'{path}:{line}: environments.dev.listen[0]: expected "host:port", got "8787"'
    assert status["config"]["generation"] == 1  # type: ignore[index]
    assert await models(proxy.session, proxy.url) == 200

    path.write_text(good.replace("allowed_hosts = []", 'allowed_hosts = ["fixed.example"]'))
    await eventually(lambda: proxy.state.runtime.generation == 2, "a valid rewrite after a bad one")
    status = await get_status(proxy)
    assert status["config"]["last_reload_error"] is None  # type: ignore[index]
    assert await models(proxy.session, proxy.url, "fixed.example") == 200


async def test_valid_rewrite_swaps_the_generation(
    mock_upstream: tuple[str, MockState], start_proxy: StartProxy, canary_env: str
) -> None:
    url, _ = mock_upstream
    proxy = await start_proxy(make_config(url))
    path = proxy.state.runtime.settings.path
    assert await models(proxy.session, proxy.url, "new-name.example") == 403

    path.write_text(make_config(url, hosts=["new-name.example"]))
    await eventually(lambda: proxy.state.runtime.generation == 2, "generation 2")
    status = await get_status(proxy)
    assert status["config"]["generation"] == 2  # type: ignore[index]
    assert await models(proxy.session, proxy.url, "new-name.example") == 200
    assert await models(proxy.session, proxy.url) == 200


async def test_editor_style_save_is_picked_up(
    mock_upstream: tuple[str, MockState], start_proxy: StartProxy, canary_env: str
) -> None:
    url, _ = mock_upstream
    proxy = await start_proxy(make_config(url))
    path = proxy.state.runtime.settings.path
    replace_file(path, make_config(url, hosts=["saved.example"]))
    await eventually(lambda: proxy.state.runtime.generation == 2, "the renamed-over file is seen")
    assert await models(proxy.session, proxy.url, "saved.example") == 200
    # And again: the watcher follows the name, not the first file's inode.
    replace_file(path, make_config(url, hosts=["saved-again.example"]))
    await eventually(lambda: proxy.state.runtime.generation == 3, "a second rename is seen too")
    assert await models(proxy.session, proxy.url, "saved-again.example") == 200
    assert await models(proxy.session, proxy.url, "saved.example") == 403


async def test_other_files_in_the_folder_are_ignored(
    mock_upstream: tuple[str, MockState], start_proxy: StartProxy, canary_env: str
) -> None:
    url, _ = mock_upstream
    proxy = await start_proxy(make_config(url))
    path = proxy.state.runtime.settings.path
    (path.parent / "other.toml").write_text("not = [valid")
    path.write_text(make_config(url, hosts=["after.example"]))
    await eventually(lambda: proxy.state.runtime.generation == 2, "the real change")
    assert proxy.state.last_reload_error is None


# -- listeners and environments --------------------------------------------------------------


async def test_new_listener_is_bound_and_removed_one_stops(
    mock_upstream: tuple[str, MockState], start_proxy: StartProxy, canary_env: str
) -> None:
    url, _ = mock_upstream
    first, second = free_port(), free_port()
    proxy = await start_proxy(make_config(url, {"dev": [f"127.0.0.1:{first}"]}, watch=False))
    path = proxy.state.runtime.settings.path
    assert not accepts(second)

    path.write_text(make_config(url, {"dev": [f"127.0.0.1:{first}", f"127.0.0.1:{second}"]}, watch=False))
    assert await proxy.server.reload() is None
    assert await models(proxy.session, f"http://127.0.0.1:{second}") == 200
    assert await models(proxy.session, f"http://127.0.0.1:{first}") == 200
    assert sorted(proxy.server.addresses("dev")) == sorted([f"127.0.0.1:{first}", f"127.0.0.1:{second}"])

    path.write_text(make_config(url, {"dev": [f"127.0.0.1:{second}"]}, watch=False))
    assert await proxy.server.reload() is None
    await eventually(lambda: not accepts(first), f"port {first} stops accepting")
    assert await models(proxy.session, f"http://127.0.0.1:{second}") == 200
    assert proxy.server.addresses("dev") == [f"127.0.0.1:{second}"]
    assert proxy.state.runtime.generation == 3


async def test_environment_added_and_removed(
    mock_upstream: tuple[str, MockState], start_proxy: StartProxy, canary_env: str
) -> None:
    url, mock = mock_upstream
    dev_port, staging_port = free_port(), free_port()
    proxy = await start_proxy(make_config(url, {"dev": [f"127.0.0.1:{dev_port}"]}, watch=False))
    path = proxy.state.runtime.settings.path
    staging = f"http://127.0.0.1:{staging_port}"

    both = {"dev": [f"127.0.0.1:{dev_port}"], "staging": [f"127.0.0.1:{staging_port}"]}
    path.write_text(make_config(url, both, watch=False))
    async with proxy.session.post(f"{proxy.url}/-/reload") as r:
        assert r.status == 200
        assert await r.json() == {"ok": True, "generation": 2, "error": None}
    status, body = await create(proxy.session, staging, "bob")
    assert status == 201, body
    assert mock.seen[-1].headers["x-api-key"] == CANARY
    document = await get_status(proxy)
    assert set(document["environments"]) == {"dev", "staging"}  # type: ignore[arg-type]

    path.write_text(make_config(url, {"staging": [f"127.0.0.1:{staging_port}"]}, watch=False))
    async with proxy.session.post(f"{staging}/-/reload") as r:
        assert (await r.json())["ok"] is True
    await eventually(lambda: not accepts(dev_port), "the removed environment's port closes")
    assert await models(proxy.session, staging) == 200
    async with proxy.session.get(f"{staging}/-/status") as r:
        assert set((await r.json())["environments"]) == {"staging"}
    await eventually(lambda: audit_lines(proxy.audit_path), "the staging create's audit line")
    assert [line["environment"] for line in audit_lines(proxy.audit_path)] == ["staging"]


async def test_reload_that_cannot_bind_keeps_the_other_changes(
    mock_upstream: tuple[str, MockState], start_proxy: StartProxy, canary_env: str
) -> None:
    url, _ = mock_upstream
    port = free_port()
    proxy = await start_proxy(make_config(url, {"dev": [f"127.0.0.1:{port}"]}, watch=False))
    path = proxy.state.runtime.settings.path
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        path.write_text(
            make_config(
                url, {"dev": [f"127.0.0.1:{port}", f"127.0.0.1:{busy}"]}, hosts=["b.example"], watch=False
            )
        )
        async with proxy.session.post(f"{proxy.url}/-/reload") as r:
            assert r.status == 409
            answer = await r.json()
        assert answer["ok"] is False and answer["generation"] == 2
        assert f"cannot listen on 127.0.0.1:{busy}" in answer["error"]
        assert "environment dev" in answer["error"]
        status = await get_status(proxy)
        assert status["config"]["generation"] == 2  # type: ignore[index]
        assert f"127.0.0.1:{busy}" in status["config"]["last_reload_error"]  # type: ignore[index]
        assert await models(proxy.session, proxy.url, "b.example") == 200  # the other change applied
        assert proxy.server.addresses("dev") == [f"127.0.0.1:{port}"]

    # The port is free now: the next reload binds it and clears the error.
    async with proxy.session.post(f"{proxy.url}/-/reload") as r:
        assert r.status == 200, await r.text()
    assert await models(proxy.session, f"http://127.0.0.1:{busy}") == 200
    assert (await get_status(proxy))["config"]["last_reload_error"] is None  # type: ignore[index]


async def test_post_reload_reports_an_invalid_file(
    mock_upstream: tuple[str, MockState], start_proxy: StartProxy, canary_env: str
) -> None:
    url, _ = mock_upstream
    good = make_config(url, watch=False)
    proxy = await start_proxy(good)
    path = proxy.state.runtime.settings.path
    path.write_text(good.replace("shutdown_timeout = 5", "shutdown_timeout = true"))
    async with proxy.session.post(f"{proxy.url}/-/reload") as r:
        assert r.status == 409
        answer = await r.json()
    assert answer["ok"] is False and answer["generation"] == 1
    assert answer["error"] == f"{path}:3: server.shutdown_timeout: expected a number, got true"
    assert await models(proxy.session, proxy.url) == 200


async def test_reload_with_an_unresolvable_key_keeps_serving(
    mock_upstream: tuple[str, MockState], start_proxy: StartProxy, canary_env: str
) -> None:
    url, _ = mock_upstream
    good = make_config(url, watch=False)
    proxy = await start_proxy(good)
    proxy.state.runtime.settings.path.write_text(
        good.replace("env:SKYPROXY_TEST_KEY", "env:SKYPROXY_UNSET_X")
    )
    error = await proxy.server.reload()
    assert error is not None and "$SKYPROXY_UNSET_X is not set" in error and "'dev'" in error
    assert proxy.state.runtime.generation == 1
    assert await models(proxy.session, proxy.url) == 200


async def test_steady_load_through_twenty_rewrites(
    mock_upstream: tuple[str, MockState], start_proxy: StartProxy, canary_env: str
) -> None:
    url, _ = mock_upstream
    proxy = await start_proxy(make_config(url))
    path = proxy.state.runtime.settings.path
    failures: list[object] = []
    done = 0
    stop = asyncio.Event()

    async def client(user: str) -> None:
        nonlocal done
        while not stop.is_set():
            try:
                if done % 2:
                    status, _ = await create(proxy.session, proxy.url, user)
                    ok = status == 201
                else:
                    status = await models(proxy.session, proxy.url)
                    ok = status == 200
            except aiohttp.ClientError as exc:
                failures.append(exc)
                continue
            done += 1
            if not ok:
                failures.append(status)

    clients = [asyncio.create_task(client(f"u{i}")) for i in range(4)]
    generation = 1
    for i in range(20):
        before = done
        if i % 4 == 3:
            text = make_config(url, server=f'log_level = "loud-{i}"')
            marker = f'"loud-{i}"'
        else:
            text = make_config(url, hosts=[f"host-{i}.example"])
            generation += 1
        if i % 2:
            replace_file(path, text)
        else:
            path.write_text(text)
        if i % 4 == 3:
            await eventually(
                lambda: marker in (proxy.state.last_reload_error or ""),  # noqa: B023
                f"rewrite {i} rejected",
            )
        else:
            await eventually(lambda: proxy.state.runtime.generation == generation, f"rewrite {i} applied")  # noqa: B023
        await eventually(lambda: done > before, "requests keep flowing")  # noqa: B023
    stop.set()
    await asyncio.gather(*clients)

    assert failures == []
    assert done > 40
    assert proxy.state.runtime.generation == 16
    assert await models(proxy.session, proxy.url, "host-18.example") == 200
    assert await models(proxy.session, proxy.url, "host-17.example") == 403
    assert_no_canary(proxy.audit_path.read_text())


# -- key rotation (the real keyring, a daemon subprocess) ------------------------------------

OLD = "sk-old-" + "5e6f7a8b9c0d1e2f3a4b"
NEW = "sk-new-" + "a9b8c7d6e5f4a3b2c1d0"
BAD = "sk-bad-" + "0000111122223333aaaa"


@pytest.fixture
def keyring_dev(secret_service: dict[str, str]) -> Iterator[dict[str, str]]:
    import keyring
    import keyring.errors

    def clean() -> None:
        for name in ("dev", "dev@previous"):
            with contextlib.suppress(keyring.errors.PasswordDeleteError):
                keyring.delete_password(SERVICE, name)

    clean()
    keyring.set_password(SERVICE, "dev", OLD)
    yield secret_service
    clean()


@pytest.fixture
async def switchable_mock() -> AsyncIterator[tuple[str, MockState]]:
    app = create_mock_app([OLD], delay=0.3)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/"), app[MOCK_STATE]
    await server.close()


async def key_command(env: dict[str, str], *args: str, stdin: str = "") -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "skyproxy"),
        "key",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def rotation_config(tmp_path: Path, upstream: str, port: int) -> Path:
    body = (
        f"[server]\nwatch_config = false\nshutdown_timeout = 5\n\n"
        f'[environments.dev]\nlisten = ["127.0.0.1:{port}"]\nupstream = "{upstream}"\nkey = "keyring"\n'
        f'{NO_LIMITS}\n\n[audit]\npath = "audit/audit.jsonl"\n'
    )
    return write_config(tmp_path, body)


def served_fingerprint(status: dict[str, object]) -> str:
    return str(status["environments"]["dev"]["key"]["fingerprint"])  # type: ignore[index]


async def test_rotate_under_load_then_rollback(
    tmp_path: Path,
    keyring_dev: dict[str, str],
    switchable_mock: tuple[str, MockState],
    spawn: Spawn,
) -> None:
    import keyring

    url, mock = switchable_mock
    port = free_port()
    config = rotation_config(tmp_path, url, port)
    daemon = await asyncio.to_thread(spawn, config, port, keyring_dev)
    results: list[tuple[int, bool]] = []  # (status, after the rotation reported done)
    rotated = False
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        # One request at a time, so the audit file's order is the order of requests.
        while not stop.is_set():
            status, _ = await create(session, daemon.url)
            results.append((status, rotated))

    async with aiohttp.ClientSession() as session:
        assert served_fingerprint(await status_of(session, daemon)) == fingerprint(OLD)
        task = asyncio.create_task(client(session))
        await eventually(lambda: len(results) >= 20, "load before the rotation")

        mock.accepted_keys = {OLD, NEW}  # the new key exists; the old one is not revoked yet
        code, out, err = await key_command(
            keyring_dev, "rotate", "dev", "--stdin", "-c", str(config), stdin=NEW
        )
        assert code == 0, out + err
        rotated = True
        mock.accepted_keys = {NEW}  # the old key is revoked
        assert f"verified the new key {fingerprint(NEW)}" in out
        assert f"the daemon now serves dev with {fingerprint(NEW)}" in out
        assert f"kept {fingerprint(OLD)} as dev@previous" in out
        assert NEW not in out + err and OLD not in out + err

        count = len(results)
        await eventually(lambda: len(results) >= count + 20, "load after the rotation")
        stop.set()
        await task
        assert served_fingerprint(await status_of(session, daemon)) == fingerprint(NEW)

        assert [s for s, _ in results if s != 201] == [], "a request failed during the rotation"
        assert sum(1 for _, after in results if after) >= 20
        assert keyring.get_password(SERVICE, "dev") == NEW
        assert keyring.get_password(SERVICE, "dev@previous") == OLD
        state = json.loads((tmp_path / "audit" / "keys.json").read_text())
        assert state["keys"]["dev"]["fingerprint"] == fingerprint(NEW)

        # The audit trail switches key once: old..., then new..., never back.
        await eventually(
            lambda: len(audit_lines(tmp_path / "audit" / "audit.jsonl")) >= len(results), "lines"
        )
        prints = [line["keyFingerprint"] for line in audit_lines(tmp_path / "audit" / "audit.jsonl")]
        switch = prints.index(fingerprint(NEW))
        assert switch > 0
        assert set(prints[:switch]) == {fingerprint(OLD)}
        assert set(prints[switch:]) == {fingerprint(NEW)}

        # Rollback: the old key comes back, the new one is kept as previous.
        mock.accepted_keys = {OLD, NEW}
        code, out, err = await key_command(keyring_dev, "rollback", "dev", "-c", str(config))
        assert code == 0, out + err
        assert f"restored {fingerprint(OLD)}" in out
        assert served_fingerprint(await status_of(session, daemon)) == fingerprint(OLD)
        assert keyring.get_password(SERVICE, "dev") == OLD
        assert keyring.get_password(SERVICE, "dev@previous") == NEW
        status, _ = await create(session, daemon.url)
        assert status == 201
        assert mock.seen[-1].headers["x-api-key"] == OLD
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait, 30) == 0
    assert OLD not in daemon.stderr() and NEW not in daemon.stderr()
    assert NEW not in (tmp_path / "audit" / "audit.jsonl").read_text()


async def test_rotate_refuses_a_key_the_upstream_rejects(
    tmp_path: Path,
    keyring_dev: dict[str, str],
    switchable_mock: tuple[str, MockState],
    spawn: Spawn,
) -> None:
    import keyring

    url, mock = switchable_mock
    port = free_port()
    config = rotation_config(tmp_path, url, port)
    daemon = await asyncio.to_thread(spawn, config, port, keyring_dev)
    state_file = tmp_path / "audit" / "keys.json"
    await eventually(state_file.exists, "the daemon records the key it serves")
    state_before = state_file.read_text()

    code, out, err = await key_command(keyring_dev, "rotate", "dev", "--stdin", "-c", str(config), stdin=BAD)
    assert code == 1, out + err
    assert f"the upstream refused the new key {fingerprint(BAD)} (401); nothing was changed" in err
    assert BAD not in out + err
    assert keyring.get_password(SERVICE, "dev") == OLD
    assert keyring.get_password(SERVICE, "dev@previous") is None
    assert state_file.read_text() == state_before
    assert [seen.path for seen in mock.seen] == ["/v1/models"]  # verified, then nothing else
    async with aiohttp.ClientSession() as session:
        assert served_fingerprint(await status_of(session, daemon)) == fingerprint(OLD)
        assert generation_of(await status_of(session, daemon)) == 1


def generation_of(status: dict[str, object]) -> int:
    return int(status["config"]["generation"])  # type: ignore[index]


async def test_rotate_refuses_a_non_keyring_environment(
    tmp_path: Path, secret_service: dict[str, str]
) -> None:
    config = write_config(
        tmp_path,
        '[environments.dev]\nlisten = ["127.0.0.1:8787"]\nupstream = "http://127.0.0.1:9"\nkey = "env:K"\n',
    )
    code, out, err = await key_command(
        secret_service, "rotate", "dev", "--stdin", "-c", str(config), stdin=NEW
    )
    assert code == 1
    assert "takes its key from env:K" in err
    assert NEW not in out + err
