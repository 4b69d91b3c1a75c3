"""What `check`, `key show` and `key list` report per key: real sources, a real state file."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from helpers import CANARY, assert_no_canary

from skyproxy.config import KeySpec
from skyproxy.keys import ages
from skyproxy.keys.ages import KeyRecord
from skyproxy.keys.secret import fingerprint
from skyproxy.keys.status import KeyStatus, key_statuses

ENV = {"SKY_DEV": CANARY}
DEV = {"dev": KeySpec("env", "SKY_DEV")}


def days_ago(days: int) -> datetime:
    return datetime.now(timezone.utc) - timedelta(days=days, hours=1)


def test_a_key_never_recorded_has_no_age() -> None:
    [status] = key_statuses(DEV, {}, 90, ENV)
    assert status == KeyStatus("dev", KeySpec("env", "SKY_DEV"), fingerprint(CANARY))
    assert status.ok and not status.too_old and not status.generated
    assert_no_canary(repr(status))


def test_the_age_counts_only_for_the_recorded_fingerprint() -> None:
    records = {"dev": KeyRecord(fingerprint(CANARY), days_ago(12))}
    [status] = key_statuses(DEV, records, 90, ENV)
    assert status.age_days == 12
    assert not status.too_old

    other = {"dev": KeyRecord(fingerprint("sk-older-key-1234"), days_ago(400))}
    [status] = key_statuses(DEV, other, 90, ENV)
    assert status.age_days is None  # another key was recorded: this one's age is unknown
    assert not status.too_old


def test_a_key_past_the_limit_is_too_old_but_still_ok() -> None:
    records = {"dev": KeyRecord(fingerprint(CANARY), days_ago(31))}
    [status] = key_statuses(DEV, records, 30, ENV)
    assert status.ok and status.too_old
    assert status.age_days == 31
    [status] = key_statuses(DEV, {"dev": KeyRecord(fingerprint(CANARY), days_ago(30))}, 30, ENV)
    assert not status.too_old  # the limit itself is still fine


def test_an_unresolvable_key_carries_the_reason_and_the_fix() -> None:
    [status] = key_statuses(DEV, {"dev": KeyRecord(fingerprint(CANARY), days_ago(1))}, 90, {})
    assert not status.ok
    assert status.fingerprint is None and status.age_days is None
    assert (
        status.problem
        == "environment variable $SKY_DEV is not set; run: export SKY_DEV=... before starting skyproxy"
    )


def test_a_problem_without_a_fix_is_just_the_reason(tmp_path: Path) -> None:
    folder = tmp_path / "dev.key"
    folder.mkdir()
    [status] = key_statuses({"dev": KeySpec("file", str(folder))}, {}, 90, {})
    assert status.problem is not None and status.problem.startswith("cannot read: ")
    assert ";" not in status.problem


def test_generated_keys_and_order(tmp_path: Path) -> None:
    specs = {"b": KeySpec("generated"), "a": KeySpec("env", "SKY_DEV")}
    statuses = key_statuses(specs, {}, 90, ENV)
    assert [s.environment for s in statuses] == ["b", "a"]
    assert statuses[0].generated and statuses[0].ok


def test_statuses_read_with_the_state_file(tmp_path: Path) -> None:
    state = tmp_path / "keys.json"
    ages.record(state, "dev", fingerprint(CANARY), now=days_ago(5))
    [status] = key_statuses(DEV, ages.read(state), 90, ENV)
    assert status.age_days == 5
