"""`skyproxy check` with [cluster]: one PING, host and database shown, the password never."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path

from helpers import VENV_BIN, write_config
from helpers.redis_server import RedisServer

Start = Callable[..., RedisServer]

CONFIG = """
[environments.dev]
listen = ["127.0.0.1:0"]
upstream = "mock"

[cluster]
redis = "env:SKYPROXY_REDIS_URL"
on_error = "closed"
timeout_ms = 300
"""


def check(config: Path, redis_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SKYPROXY_REDIS_URL": redis_url}
    return subprocess.run(
        [str(VENV_BIN / "skyproxy"), "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_check_pings_redis_and_shows_only_host_and_db(tmp_path: Path, start_redis: Start) -> None:
    password = "pw-canary-" + secrets.token_hex(12)
    server = start_redis(password=password)
    config = write_config(tmp_path, CONFIG)
    shown = f"redis://127.0.0.1:{server.port}/0"
    outputs: list[str] = []

    up = check(config, server.url)
    outputs += [up.stdout, up.stderr]
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"cluster: Redis {shown} answered PING in" in up.stdout

    wrong = check(config, server.url.replace(password, password[::-1]))
    outputs += [wrong.stdout, wrong.stderr]
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert f"cluster: Redis {shown} did not answer PING" in wrong.stdout

    # A paused server accepts the connection and never answers: the deadline ends the check.
    server.pause()
    try:
        paused = check(config, server.url)
    finally:
        server.resume()
    outputs += [paused.stdout, paused.stderr]
    assert paused.returncode == 1, paused.stdout + paused.stderr
    assert f"cluster: Redis {shown} did not answer PING (no answer within 300 ms)" in paused.stdout

    server.stop()
    down = check(config, server.url)
    outputs += [down.stdout, down.stderr]
    assert down.returncode == 1, down.stdout + down.stderr
    assert f"cluster: Redis {shown} did not answer PING" in down.stdout

    unset = check(config, "")
    outputs += [unset.stdout, unset.stderr]
    assert unset.returncode == 1
    assert "cluster: cannot read the Redis URL from env:SKYPROXY_REDIS_URL" in unset.stdout

    for text in outputs:
        assert password not in text and password[::-1] not in text, text
        assert "Traceback" not in text, text


def test_check_without_cluster_does_not_mention_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, CONFIG.split("[cluster]")[0])
    result = check(config, "")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Redis" not in result.stdout
