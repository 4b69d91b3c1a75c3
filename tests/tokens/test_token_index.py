"""The daemon's token index: verify, expiry, identity, hot reload, last-used writes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from helpers.daemon import eventually

from skyproxy.tokens import registry, store
from skyproxy.tokens.registry import Tokens


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


NOW = datetime(2026, 11, 26, 10, 0, tzinfo=timezone.utc)


def test_verify_accepts_a_valid_token_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    token = store.create(path, "app", ["dev"])
    tokens = Tokens(path)
    tokens.load()
    found = tokens.verify(token.reveal())
    assert found is not None and found.name == "app" and found.environments == {"dev"}
    for wrong in (
        "",
        "skp_",
        token.reveal()[:-1],
        token.reveal() + "x",
        token.reveal().upper(),
        "x" * 10_000,
    ):
        assert tokens.verify(wrong) is None


def test_expired_revoked_and_unknown_look_the_same(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    clock = Clock(NOW.timestamp())
    expiring = store.create(path, "short", ["dev"], expires_days=1, now=NOW)
    revoked = store.create(path, "gone", ["dev"], now=NOW)
    store.revoke(path, "gone")
    tokens = Tokens(path, clock)
    tokens.load()
    assert tokens.verify(expiring.reveal()) is not None
    clock.now += 86_400 - 1
    assert tokens.verify(expiring.reveal()) is not None
    clock.now += 1
    assert tokens.verify(expiring.reveal()) is None
    assert tokens.verify(revoked.reveal()) is None
    assert tokens.verify("skp_" + "A" * 43) is None


def test_a_token_verified_before_is_refused_once_revoked(tmp_path: Path) -> None:
    """Verified values are remembered to spare the hash; a reload must forget them."""
    path = tmp_path / "tokens.json"
    kept = store.create(path, "kept", ["dev"])
    gone = store.create(path, "gone", ["dev"])
    tokens = Tokens(path)
    tokens.load()
    for _ in range(3):
        assert tokens.verify(gone.reveal()) is not None
    store.revoke(path, "gone")
    tokens.load()
    assert tokens.verify(gone.reveal()) is None
    found = tokens.verify(kept.reveal())
    assert found is not None and found.name == "kept"


def test_refusals_take_the_same_time(tmp_path: Path) -> None:
    # Interleaved batches, compared by median: robust to a busy machine, yet a refusal
    # that took a shortcut (say, skipping the compare or the hash) would show up.
    path = tmp_path / "tokens.json"
    clock = Clock(NOW.timestamp())
    expired = store.create(path, "short", ["dev"], expires_days=1, now=NOW)
    revoked = store.create(path, "gone", ["dev"], now=NOW)
    for i in range(4):
        store.create(path, f"other{i}", ["dev"], now=NOW)
    store.revoke(path, "gone")
    tokens = Tokens(path, clock)
    tokens.load()
    clock.now += 2 * 86_400
    cases = {"expired": expired.reveal(), "revoked": revoked.reveal(), "unknown": "skp_" + "B" * 43}
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(300):
        for name, value in cases.items():
            started = time.perf_counter_ns()
            for _ in range(20):
                tokens.verify(value)
            timings[name].append(time.perf_counter_ns() - started)
    medians = {name: statistics.median(t) for name, t in timings.items()}
    assert max(medians.values()) < 1.5 * min(medians.values()), medians


@pytest.mark.parametrize(
    ("binding", "header", "expected"),
    [
        ({"user": "alice"}, "mallory", "alice"),
        ({"user": "alice"}, None, "alice"),
        ({"trust_user_header": True}, "end-user-7", "end-user-7"),
        ({"trust_user_header": True}, None, None),
        ({}, "mallory", "app"),
    ],
)
def test_identity_follows_the_binding(
    tmp_path: Path, binding: dict[str, object], header: str | None, expected: str | None
) -> None:
    path = tmp_path / "tokens.json"
    token = store.create(path, "app", ["dev"], **binding)  # type: ignore[arg-type]
    tokens = Tokens(path)
    tokens.load()
    found = tokens.verify(token.reveal())
    assert found is not None and found.user_id(header) == expected


def test_last_used_is_written_at_most_once_a_minute(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    clock = Clock(NOW.timestamp())
    token = store.create(path, "app", ["dev"], now=NOW)
    tokens = Tokens(path, clock)
    tokens.load()
    assert not tokens.flush_last_used()  # never used: nothing to write
    tokens.verify(token.reveal())
    assert tokens.flush_last_used()
    assert store.read(path)[0].last_used == NOW
    clock.now += 59
    tokens.verify(token.reveal())
    assert not tokens.flush_last_used()
    clock.now += 1
    tokens.verify(token.reveal())
    assert tokens.flush_last_used()
    assert store.read(path)[0].last_used == datetime.fromtimestamp(NOW.timestamp() + 60, timezone.utc)


@contextlib.asynccontextmanager
async def watching(tokens: Tokens) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(registry.watch(tokens, stop, poll=0.1))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def _in_another_process(*code: str) -> None:
    subprocess.run([sys.executable, "-c", "\n".join(code)], check=True, timeout=60)


async def test_create_and_revoke_apply_within_two_seconds(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    token = store.create(path, "app", ["dev"])
    tokens = Tokens(path)
    await asyncio.to_thread(tokens.load)
    async with watching(tokens):
        assert tokens.verify(token.reveal()) is not None
        await asyncio.to_thread(
            _in_another_process,
            "from pathlib import Path",
            "from skyproxy.tokens import store",
            f"store.revoke(Path({str(path)!r}), 'app')",
        )
        revoked_at = time.monotonic()
        await eventually(lambda: tokens.verify(token.reveal()) is None, "the revoke applied", 2.0)
        assert time.monotonic() - revoked_at < 2.0
        fresh = await asyncio.to_thread(store.create, path, "new", ["dev"])
        await eventually(lambda: tokens.verify(fresh.reveal()) is not None, "the new token loaded", 2.0)
        path.unlink()  # no file: no tokens
        await eventually(lambda: len(tokens) == 0, "the removed file emptied the index", 2.0)


async def test_a_damaged_file_keeps_the_tokens_loaded_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.json"
    token = store.create(path, "app", ["dev"])
    tokens = Tokens(path)
    await asyncio.to_thread(tokens.load)
    caplog.set_level(logging.ERROR, "skyproxy.tokens")
    async with watching(tokens):
        path.write_text("{ half a file")
        await eventually(lambda: tokens.problem is not None, "the damage noticed", 5.0)
        assert tokens.verify(token.reveal()) is not None
        seen = tokens.checks
        await eventually(lambda: tokens.checks >= seen + 3, "three more looks at the file")
        assert len([r for r in caplog.records if "not JSON" in r.getMessage()]) == 1
        store.write(path, [])
        await eventually(lambda: tokens.verify(token.reveal()) is None, "the repaired file loaded", 5.0)
        assert tokens.problem is None
