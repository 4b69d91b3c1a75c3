"""In-flight caps: per user per rule, all-or-none across rules, released once, kept over reloads."""

from __future__ import annotations

from pathlib import Path

from helpers import write_config

from skyproxy import config
from skyproxy.proxy.inflight import InFlight, Slots, TooMany

RULES = """
[environments.dev]
listen = ["127.0.0.1:8787"]
upstream = "mock"

[[rate_limit.rules]]
name = "creates"
paths = ["/v1/predictions"]
max_in_flight = {creates}

[[rate_limit.rules]]
name = "everything"
methods = ["GET", "POST"]
paths = ["/v1/*"]
max_in_flight = 3
"""


def caps(tmp_path: Path, creates: int = 2, previous: InFlight | None = None) -> InFlight:
    settings = config.load(write_config(tmp_path, RULES.format(creates=creates)), {})
    return InFlight(settings.environments, previous)


def test_a_cap_is_per_user_and_per_rule(tmp_path: Path) -> None:
    inflight = caps(tmp_path)
    held = [inflight.enter("dev", "POST", "/v1/predictions", "alice") for _ in range(2)]
    assert all(isinstance(s, Slots) for s in held)
    over = inflight.enter("dev", "POST", "/v1/predictions", "alice")
    assert over == TooMany("creates", 2) and over.retry_after == 1
    assert isinstance(inflight.enter("dev", "POST", "/v1/predictions", "bob"), Slots)
    assert isinstance(inflight.enter("dev", "GET", "/v1/models", "alice"), Slots)  # 3rd on "everything"
    assert inflight.enter("dev", "GET", "/v1/models", "alice") == TooMany("everything", 3)
    assert isinstance(inflight.enter("dev", "GET", "/health", "alice"), Slots)  # no rule matches


def test_a_refusal_takes_nothing_and_a_release_gives_back_once(tmp_path: Path) -> None:
    inflight = caps(tmp_path, creates=5)
    held = [inflight.enter("dev", "GET", "/v1/models", "alice") for _ in range(3)]
    assert isinstance(inflight.enter("dev", "POST", "/v1/predictions", "alice"), TooMany)  # "everything" full
    assert inflight.counts == {("dev", "everything", "alice"): 3}
    first = held[0]
    assert isinstance(first, Slots)
    first.release()
    first.release()
    assert inflight.counts == {("dev", "everything", "alice"): 2}
    slot = inflight.enter("dev", "POST", "/v1/predictions", "alice")
    assert isinstance(slot, Slots)
    assert inflight.counts[("dev", "creates", "alice")] == 1
    for s in [*held[1:], slot]:
        assert isinstance(s, Slots)
        s.release()
    assert inflight.counts == {}  # nothing kept for users with nothing in flight


def test_counts_survive_a_reload(tmp_path: Path) -> None:
    old = caps(tmp_path, creates=2)
    held = old.enter("dev", "POST", "/v1/predictions", "alice")
    new = caps(tmp_path, creates=1, previous=old)
    assert new.enter("dev", "POST", "/v1/predictions", "alice") == TooMany("creates", 1)
    assert isinstance(held, Slots)
    held.release()
    assert isinstance(new.enter("dev", "POST", "/v1/predictions", "alice"), Slots)


def test_no_cap_configured_costs_nothing(tmp_path: Path) -> None:
    settings = config.load(
        write_config(tmp_path, '[environments.dev]\nlisten = ["127.0.0.1:1"]\nupstream = "mock"\n'), {}
    )
    inflight = InFlight(settings.environments)
    assert not inflight.is_capped("dev")
    for _ in range(1000):
        inflight.enter("dev", "POST", "/v1/predictions", "alice")
    assert inflight.counts == {}
