"""Operator-facing signals: the revoked-key alarm, key age warnings, watchdog pings, the loop."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from helpers import CANARY, assert_no_canary, env_config, free_port, write_config

from skyproxy.keys.secret import fingerprint


async def test_upstream_401_raises_the_alarm_and_is_counted(
    mock_upstream, start_proxy, canary_env, caplog: pytest.LogCaptureFixture, monkeypatch
):
    url, state = mock_upstream
    state.accepted_keys = {"sk-some-other-key"}  # the upstream has revoked ours
    proxy = await start_proxy(env_config(url))
    logger = logging.getLogger("skyproxy")
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.ERROR, logger="skyproxy"):
        async with proxy.session.get(f"{proxy.url}/v1/models") as r:
            assert r.status == 401
            assert (await r.json())["error"]["error_id"] == "UNAUTHORIZED"
    alarms = [rec.getMessage() for rec in caplog.records if "key rejected by upstream" in rec.getMessage()]
    assert len(alarms) == 1
    assert "environment dev" in alarms[0] and "revoked or rotated?" in alarms[0]
    assert fingerprint(CANARY) in alarms[0]
    assert_no_canary(caplog.text)
    async with proxy.session.get(f"{proxy.url}/-/metrics") as r:
        assert 'skyproxy_upstream_unauthorized_total{environment="dev"} 1.0' in await r.text()


def _old_key_state(folder: Path, days: int) -> None:
    set_at = (datetime.now(timezone.utc) - timedelta(days=days)).isoformat()
    (folder / "audit").mkdir(exist_ok=True)
    state = {"keys": {"dev": {"fingerprint": fingerprint(CANARY), "set_at": set_at}}}
    (folder / "audit" / "keys.json").write_text(json.dumps(state))


async def test_an_old_key_is_reported_at_startup_and_in_status(mock_upstream, tmp_path: Path, run_daemon):
    url, _ = mock_upstream
    port = free_port()
    _old_key_state(tmp_path, days=120)
    config = write_config(
        tmp_path, env_config(url, listen=f"127.0.0.1:{port}", extra="[keys]\nmax_age_days = 90\n")
    )
    daemon = await asyncio.to_thread(run_daemon, config, port)
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{daemon.url}/-/status") as r:
        status = await r.json()
    assert status["environments"]["dev"]["key"]["age_days"] == 120
    assert "is 120 days old (max_age_days = 90)" in daemon.stderr()
    assert "skyproxy key rotate dev" in daemon.stderr()
    assert_no_canary(daemon.stderr(), status)


async def test_a_fresh_key_is_not_reported(mock_upstream, tmp_path: Path, run_daemon):
    url, _ = mock_upstream
    port = free_port()
    _old_key_state(tmp_path, days=3)
    config = write_config(tmp_path, env_config(url, listen=f"127.0.0.1:{port}"))
    daemon = await asyncio.to_thread(run_daemon, config, port)
    assert "days old" not in daemon.stderr()


async def test_the_daemon_pings_the_watchdog(mock_upstream, tmp_path: Path, run_daemon):
    url, _ = mock_upstream
    port = free_port()
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "notify.sock")
    receiver.bind(address)
    receiver.settimeout(10)
    try:
        config = write_config(tmp_path, env_config(url, listen=f"127.0.0.1:{port}"))
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}  # a ping every 0.1 s
        await asyncio.to_thread(run_daemon, config, port, env)
        seen: list[bytes] = []
        while seen.count(b"WATCHDOG=1") < 3:
            seen.append(await asyncio.to_thread(receiver.recv, 4096))
        assert any(message.startswith(b"READY=1") for message in seen)
    finally:
        receiver.close()


@pytest.mark.parametrize(("setting", "expected"), [("asyncio", "asyncio"), ("uvloop", "uvloop")])
async def test_the_event_loop_setting_is_honoured(
    setting: str, expected: str, mock_upstream, tmp_path: Path, run_daemon
):
    pytest.importorskip("uvloop")
    url, _ = mock_upstream
    port = free_port()
    config = write_config(
        tmp_path, env_config(url, listen=f"127.0.0.1:{port}", server=f'event_loop = "{setting}"')
    )
    daemon = await asyncio.to_thread(run_daemon, config, port)
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{daemon.url}/-/status") as r:
        assert (await r.json())["event_loop"] == expected
