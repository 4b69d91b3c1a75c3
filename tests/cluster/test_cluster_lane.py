"""The pipelined script connection against a real redis-server: replies matched to their
calls, one connection, deadlines per call, callers that give up, scripts Redis forgot."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import Iterator

import pytest
from helpers.redis_server import RedisServer
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from skyproxy.cluster.lane import ScriptLane

ECHO = "if ARGV[1] == 'bad' then return redis.error_reply('ERR refused by the script') end return ARGV[1]"


def sha_of(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


async def echo(lane: ScriptLane, value: str) -> bytes:
    answer: bytes = await lane.run(sha_of(ECHO), ECHO, ["k"], [value])
    return answer


async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(
    redis_server: RedisServer,
) -> None:
    lane = ScriptLane(redis_server.url, 5.0)
    observer = Redis.from_url(redis_server.url)
    try:
        assert await echo(lane, "warm") == b"warm"
        before = (await observer.info("stats"))["total_reads_processed"]
        values = [f"v{i}" for i in range(500)]
        answers = await asyncio.gather(*(echo(lane, v) for v in values))
        assert answers == [v.encode() for v in values]
        # Calls made together went out together: Redis read them in a few reads, not 500.
        reads = (await observer.info("stats"))["total_reads_processed"] - before
        assert reads < 50, reads
        clients = await observer.client_list()
        assert len(clients) == 2  # the lane's one connection, and the observer's
    finally:
        await lane.close()
        await observer.aclose()


async def test_an_error_reply_fails_only_its_own_call(redis_server: RedisServer) -> None:
    lane = ScriptLane(redis_server.url, 5.0)
    try:
        answers = await asyncio.gather(*(echo(lane, v) for v in ("a", "bad", "c")), return_exceptions=True)
        assert answers[0] == b"a"
        assert isinstance(answers[1], ResponseError)
        assert "refused by the script" in str(answers[1])
        assert answers[2] == b"c"
        assert await echo(lane, "d") == b"d"
    finally:
        await lane.close()


async def test_a_caller_that_gives_up_leaves_the_others_in_step(redis_server: RedisServer) -> None:
    lane = ScriptLane(redis_server.url, 5.0)
    try:
        assert await echo(lane, "warm") == b"warm"  # connected: the calls below go out together
        calls = [asyncio.ensure_future(echo(lane, f"v{i}")) for i in range(60)]
        await asyncio.sleep(0)
        for i in range(0, 60, 3):
            calls[i].cancel()
        results = await asyncio.gather(*calls, return_exceptions=True)
        for i, result in enumerate(results):
            if i % 3 == 0:
                assert isinstance(result, asyncio.CancelledError)
            else:
                assert result == f"v{i}".encode()
        assert await echo(lane, "after") == b"after"
    finally:
        await lane.close()


async def test_a_script_redis_forgot_runs_from_its_source(redis_server: RedisServer) -> None:
    lane = ScriptLane(redis_server.url, 5.0)
    observer = Redis.from_url(redis_server.url)
    try:
        assert await echo(lane, "one") == b"one"
        await observer.script_flush()
        assert await observer.script_exists(sha_of(ECHO)) == [False]
        assert await echo(lane, "two") == b"two"
        assert await observer.script_exists(sha_of(ECHO)) == [True]  # cached again
    finally:
        await lane.close()
        await observer.aclose()


async def test_a_paused_redis_fails_every_call_at_its_deadline_then_serves_again(
    redis_server: RedisServer,
) -> None:
    lane = ScriptLane(redis_server.url, 0.2)
    try:
        assert await echo(lane, "up") == b"up"
        redis_server.pause()
        started = time.monotonic()
        results = await asyncio.gather(*(echo(lane, f"v{i}") for i in range(20)), return_exceptions=True)
        waited = time.monotonic() - started
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert 0.19 <= waited < 2.0
        redis_server.resume()
        # The late replies are read and dropped; the next call gets its own.
        assert await echo(lane, "back") == b"back"
    finally:
        redis_server.resume()
        await lane.close()


async def test_a_restarted_redis_is_reached_on_a_new_connection(redis_server: RedisServer) -> None:
    lane = ScriptLane(redis_server.url, 1.0)
    try:
        assert await echo(lane, "first") == b"first"
        redis_server.restart()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert await echo(lane, "again") == b"again"
                break
            except (RedisError, OSError) as exc:  # the old connection's end, noticed once
                assert time.monotonic() < deadline, exc
    finally:
        await lane.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


async def test_connecting_to_a_server_that_never_answers_is_bounded(silent_port: int) -> None:
    lane = ScriptLane(f"redis://127.0.0.1:{silent_port}/0", 0.2)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await echo(lane, "x")
        assert time.monotonic() - started < 2.0
    finally:
        await lane.close()
