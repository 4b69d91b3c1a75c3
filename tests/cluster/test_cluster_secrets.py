"""A password in the Redis URL never shows: not in logs, errors, reprs, status or config errors."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import write_config
from helpers.daemon import eventually
from helpers.redis_server import RedisServer

from skyproxy import config
from skyproxy.cluster.backend import Bucket
from skyproxy.cluster.errors import ClusterUnavailable
from skyproxy.cluster.node import ClusterNode
from skyproxy.cluster.url import RedisURL, resolve_url
from skyproxy.config import ClusterSettings, KeySpec
from skyproxy.errors import ConfigError, KeySourceError

Start = Callable[..., RedisServer]
BUCKET = Bucket("dev", "predictions", "alice", 10, 60.0)
DEV = '[environments.dev]\nlisten = ["127.0.0.1:8787"]\nupstream = "mock"\n'


def canary() -> str:
    return "pw-canary-" + secrets.token_hex(12)


def assert_hidden(password: str, *captured: object) -> None:
    for item in captured:
        text = item if isinstance(item, str) else repr(item)
        assert password not in text, text
        assert password[-12:] not in text, text


async def test_the_password_never_shows_while_up_down_or_refused(
    start_redis: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password = canary()
    server = start_redis(password=password)
    settings = ClusterSettings(on_error="closed", redis=KeySpec("env", "SKYPROXY_REDIS_URL"), timeout_ms=300)
    node = ClusterNode.from_settings(settings, {"SKYPROXY_REDIS_URL": server.url})
    await node.start()
    wrong = ClusterNode(settings, RedisURL(server.url.replace(password, password[::-1])))
    captured: list[object] = []
    try:
        assert (await node.rates.check([BUCKET])).allowed  # the password authenticates
        captured += [node, node.connection, node.connection.url, node.status(), node.connection._redis]
        # A wrong password is an outage whose reason comes from Redis itself.
        await wrong.start()
        assert wrong.degraded
        with pytest.raises(ClusterUnavailable) as refused:
            await wrong.rates.check([BUCKET])
        captured += [str(refused.value), wrong.status()]
        server.stop()
        with pytest.raises(ClusterUnavailable) as down:
            await node.rates.check([BUCKET])
        captured += [str(down.value), repr(down.value), node.status()]
        server.start()
        await eventually(lambda: not node.degraded, "recovered", deadline_s=5)
    finally:
        await wrong.close()
        await node.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("is unavailable" in m for m in messages)
    assert any("AuthenticationError" in m or "auth" in m.lower() for m in messages), messages
    assert_hidden(password, caplog.text, *messages, *captured)
    assert str(node.connection.url) == f"RedisURL(redis://127.0.0.1:{server.port}/0)"
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(node.connection.url)


@pytest.mark.parametrize(
    "template",
    [
        "redis://:{pw}@127.0.0.1:6379/0",
        "redis://user:{pw}@127.0.0.1:6379/0",
        "rediss://default:{pw}@cache.internal:6380/2",
        "unix://:{pw}@/run/redis/redis.sock?db=1",
        "redis://127.0.0.1:6379/0?password={pw}",
    ],
)
def test_scrubbing_covers_every_place_a_password_can_sit(template: str) -> None:
    password = canary()
    url = RedisURL(template.format(pw=password))
    assert_hidden(password, repr(url), str(url), url.shown)
    assert url.scrub(f"failed: {url.reveal()} and {password}") == f"failed: {url.shown} and ***"


def test_a_literal_url_with_a_password_is_a_config_error_that_does_not_echo_it(tmp_path: Path) -> None:
    password = canary()
    path = write_config(
        tmp_path, f'{DEV}\n[cluster]\nredis = "redis://:{password}@10.0.0.5:6379/0"\non_error = "open"\n'
    )
    with pytest.raises(ConfigError) as caught:
        config.load(path, {})
    assert caught.value.field == "cluster.redis"
    assert "put the URL in a key source" in str(caught.value)
    assert_hidden(password, str(caught.value))


def test_a_key_source_holding_a_bad_url_is_refused_without_echoing_it() -> None:
    password = canary()
    settings = ClusterSettings(on_error="closed", redis=KeySpec("env", "REDIS_URL"))
    for bad in (
        f"http://:{password}@host/0",
        f"redis://:{password}@host:99999/0",
        f"redis://:{password}@host/x",
    ):
        with pytest.raises(KeySourceError) as caught:
            resolve_url(settings, {"REDIS_URL": bad})
        assert "not a Redis URL" in str(caught.value)
        assert_hidden(password, str(caught.value), repr(caught.value))


async def test_the_status_shows_host_or_socket_and_database_only(start_redis: Start, make_node: Any) -> None:
    password = canary()
    server = start_redis(password=password)
    tcp = await make_node(server.url.replace("/0", "/3"))
    unix = await make_node(server.unix_url.replace("db=0", "db=2"))
    for node in (tcp, unix):
        assert (await node.rates.check([BUCKET])).allowed
        assert not node.degraded
    assert tcp.status()["redis"] == f"redis://127.0.0.1:{server.port}/3"
    assert unix.status()["redis"] == f"unix://{server.socket}?db=2"
    assert_hidden(password, tcp.status(), unix.status(), tcp, unix)
    # Each database is its own namespace: the same bucket, fresh in database 2.
    assert (await unix.rates.check([BUCKET])).remaining(0, BUCKET) == 8
    assert (await tcp.rates.check([BUCKET])).remaining(0, BUCKET) == 8
