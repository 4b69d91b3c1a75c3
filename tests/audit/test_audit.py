"""The audit writer against real files: format, rotation, modes, reopen, failures, drain."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from skyproxy.audit import writer as audit
from skyproxy.audit.writer import AuditRecord, AuditWriter, iso_millis
from skyproxy.config import AuditSettings

FIELDS = [
    "timestamp",
    "event",
    "environment",
    "userId",
    "predictionId",
    "model",
    "status",
    "httpStatus",
    "latencyMs",
    "costUsd",
    "ipAddress",
    "requestId",
    "keyFingerprint",
    "method",
    "path",
]
T0 = datetime(2026, 11, 26, 10, 0, 0, 123000, tzinfo=timezone.utc).timestamp()


def record(i: int = 0, **changes: Any) -> AuditRecord:
    fields: dict[str, Any] = {
        "timestamp": T0,
        "environment": "production",
        "userId": "alice",
        "predictionId": f"pred_{i:06d}",
        "model": "truefusion-pro",
        "status": "created",
        "httpStatus": 201,
        "latencyMs": 412.5,
        "costUsd": 0.03,
        "ipAddress": "127.0.0.1",
        "requestId": f"req-{i:06d}",
        "keyFingerprint": "sk-…ab12",
        "method": "POST",
        "path": "/v1/predictions",
    }
    fields.update(changes)
    return AuditRecord(**fields)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    # A generous deadline: only a writer that never gets there fails, not a slow one.
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def request_ids(lines: list[str]) -> list[str]:
    return [json.loads(line)["requestId"] for line in lines]


@pytest.fixture
def open_writer(tmp_path: Path) -> Iterator[Callable[..., AuditWriter]]:
    """Builds writers (started unless told not to) and closes them all afterwards."""
    made: list[AuditWriter] = []

    def make(start: bool = True, **changes: Any) -> AuditWriter:
        changes.setdefault("path", tmp_path / "audit.jsonl")
        writer = AuditWriter(AuditSettings(**changes))
        made.append(writer)
        if start:
            writer.start()
        return writer

    yield make
    for writer in made:
        writer.close(timeout=2.0)


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "BACKOFF_MIN", 0.01)
    monkeypatch.setattr(audit, "BACKOFF_MAX", 0.05)


# -- the line -------------------------------------------------------------------------


def test_line_is_compact_json_with_fields_in_order() -> None:
    line = record().to_line()
    assert line == (
        '{"timestamp":"2026-11-26T10:00:00.123Z","event":"prediction",'
        '"environment":"production","userId":"alice","predictionId":"pred_000000",'
        '"model":"truefusion-pro","status":"created","httpStatus":201,"latencyMs":412.5,'
        '"costUsd":0.03,"ipAddress":"127.0.0.1","requestId":"req-000000",'
        '"keyFingerprint":"sk-…ab12","method":"POST","path":"/v1/predictions"}\n'
    )
    assert list(json.loads(line)) == FIELDS


@pytest.mark.parametrize(
    "changes",
    [
        {"userId": 'quote " backslash \\ newline \n tab \t bell \x07'},
        {"userId": "zoë 🦊 日本", "model": "ünïcode"},
        {"userId": None, "predictionId": None, "model": None, "latencyMs": None},
        {"costUsd": None, "ipAddress": None, "requestId": None, "keyFingerprint": None},
        {"status": "rejected", "httpStatus": 429, "latencyMs": 3, "costUsd": 1e-07},
    ],
)
def test_line_equals_json_dumps(changes: dict[str, Any]) -> None:
    rec = record(**changes)
    expected = {name: getattr(rec, name) for name in FIELDS}
    expected["timestamp"] = "2026-11-26T10:00:00.123Z"
    line = rec.to_line()
    assert line == json.dumps(expected, ensure_ascii=False, separators=(",", ":")) + "\n"
    assert line.count("\n") == 1  # one object per line, whatever the strings hold


def test_non_finite_numbers_become_null() -> None:
    data = json.loads(record(latencyMs=float("nan"), costUsd=float("inf")).to_line())
    assert data["latencyMs"] is None
    assert data["costUsd"] is None


def test_record_holds_only_the_audit_fields() -> None:
    assert [f.name for f in dataclasses.fields(AuditRecord)] == FIELDS
    assert not hasattr(record(), "__dict__")  # slotted: no stray attributes
    with pytest.raises(TypeError):
        record(prompt="a cat")
    with pytest.raises(TypeError):
        # event is always "prediction": it cannot be set
        AuditRecord(event="other", **vars_of(record()))  # type: ignore[call-arg]


def vars_of(rec: AuditRecord) -> dict[str, Any]:
    return {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec) if f.init}


@pytest.mark.parametrize(
    "timestamp",
    [0.0, 0.0005, 1.9996, T0, T0 + 0.001, T0 + 0.999, T0 + 1.0, 1_700_000_000.1, 4102444799.999],
)
def test_timestamp_is_iso_utc_with_milliseconds(timestamp: float) -> None:
    text = iso_millis(timestamp)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text)
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    assert text == moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_a_record_is_stamped_with_the_current_time() -> None:
    before = time.time()
    rec = AuditRecord(**vars_without_time())
    after = time.time()
    assert before <= rec.timestamp <= after
    assert rec.event == "prediction"


def vars_without_time() -> dict[str, Any]:
    return {k: v for k, v in vars_of(record()).items() if k != "timestamp"}


# -- writing --------------------------------------------------------------------------


def test_lines_reach_the_file_whole_and_in_order(
    tmp_path: Path, open_writer: Callable[..., AuditWriter]
) -> None:
    writer = open_writer()
    records = [record(i) for i in range(5)]
    assert all(writer.submit(r) for r in records)
    assert writer.close() == 0
    assert lines_of(tmp_path / "audit.jsonl") == [r.to_line() for r in records]
    assert writer.written == 5
    assert writer.dropped == 0
    assert writer.depth == 0


def test_lone_surrogates_still_give_valid_utf8_json(
    tmp_path: Path, open_writer: Callable[..., AuditWriter]
) -> None:
    # Undecodable header bytes reach us as lone surrogates (surrogateescape).
    writer = open_writer()
    assert writer.submit(record(userId="bad\udcff byte"))
    assert writer.close() == 0
    raw = (tmp_path / "audit.jsonl").read_bytes()
    assert json.loads(raw.decode("utf-8"))["userId"] == "bad\udcff byte"


def test_threads_submitting_at_once_never_interleave_lines(
    tmp_path: Path, open_writer: Callable[..., AuditWriter]
) -> None:
    writer = open_writer()

    def submit_many(thread: int) -> None:
        for i in range(2000):
            assert writer.submit(record(thread * 10_000 + i, userId=f"user-{thread}" * 20))

    threads = [threading.Thread(target=submit_many, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert writer.close() == 0
    lines = [json.loads(line) for line in lines_of(tmp_path / "audit.jsonl")]  # all whole
    ids = [line["requestId"] for line in lines]
    assert sorted(ids) == sorted(f"req-{t * 10_000 + i:06d}" for t in range(4) for i in range(2000))
    for t in range(4):  # each thread's lines keep their order
        mine = [line["requestId"] for line in lines if line["userId"] == f"user-{t}" * 20]
        assert mine == sorted(mine)


def test_close_drains_every_queued_line(tmp_path: Path, open_writer: Callable[..., AuditWriter]) -> None:
    writer = open_writer(max_bytes=0)  # one file, so order is easy to check
    records = [record(i) for i in range(50_000)]
    assert all(writer.submit(r) for r in records)
    assert writer.close() == 0
    assert request_ids(lines_of(tmp_path / "audit.jsonl")) == [r.requestId for r in records]
    assert writer.written == 50_000
    assert not writer.submit(record(1))  # closed: refused and counted
    assert writer.dropped == 1


def test_lines_queued_before_start_are_written_by_close(
    tmp_path: Path, open_writer: Callable[..., AuditWriter]
) -> None:
    writer = open_writer(start=False)
    assert writer.submit(record(1))
    assert writer.close() == 0
    assert request_ids(lines_of(tmp_path / "audit.jsonl")) == ["req-000001"]


def test_submit_refuses_when_the_queue_is_full(
    tmp_path: Path, open_writer: Callable[..., AuditWriter]
) -> None:
    writer = open_writer(start=False, queue_size=3)  # no writer thread: nothing drains
    assert [writer.submit(record(i)) for i in range(5)] == [True, True, True, False, False]
    assert writer.dropped == 2
    assert writer.depth == 3
    assert writer.close() == 0
    assert request_ids(lines_of(tmp_path / "audit.jsonl")) == ["req-000000", "req-000001", "req-000002"]


async def test_aclose_drains_from_the_event_loop(
    tmp_path: Path, open_writer: Callable[..., AuditWriter]
) -> None:
    writer = open_writer()
    for i in range(100):
        assert writer.submit(record(i))
    assert await writer.aclose(timeout=10.0) == 0
    assert len(lines_of(tmp_path / "audit.jsonl")) == 100


def test_a_disabled_audit_creates_no_file(tmp_path: Path, open_writer: Callable[..., AuditWriter]) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    writer = open_writer(path=path, enabled=False)
    writer.reopen()  # the idle writer wakes, and still opens nothing
    assert writer.close() == 0
    assert not path.parent.exists()
    assert writer.healthy


# -- rotation -------------------------------------------------------------------------


def rotated_oldest_first(path: Path) -> list[Path]:
    numbered = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return [*numbered, path]


def test_rotation_by_size_keeps_every_line_and_each_file_under_the_limit(
    tmp_path: Path, open_writer: Callable[..., AuditWriter]
) -> None:
    writer = open_writer(max_bytes=2000, backup_count=1000)
    records = [record(i) for i in range(300)]
    for r in records:
        assert writer.submit(r)
    assert writer.close() == 0
    files = rotated_oldest_first(tmp_path / "audit.jsonl")
    assert len(files) > 20
    assert all(f.stat().st_size <= 2000 for f in files)
    assert all(f.stat().st_size > 2000 - len(records[0].to_line()) for f in files[:-1])
    everything = [line for f in files for line in lines_of(f)]
    assert everything == [r.to_line() for r in records]


def test_rotation_by_size_honours_backup_count(
    tmp_path: Path, open_writer: Callable[..., AuditWriter]
) -> None:
    writer = open_writer(max_bytes=2000, backup_count=3)
    records = [record(i) for i in range(300)]
    for r in records:
        assert writer.submit(r)
    assert writer.close() == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    kept = [line for f in rotated_oldest_first(tmp_path / "audit.jsonl") for line in lines_of(f)]
    assert len(kept) < len(records)
    assert kept == [r.to_line() for r in records[-len(kept) :]]  # the newest, no gap


@pytest.mark.parametrize("changes", [{"max_bytes": 0}, {"max_bytes": 2000, "backup_count": 0}])
def test_no_size_rotation_without_a_limit_or_backups(
    tmp_path: Path, open_writer: Callable[..., AuditWriter], changes: dict[str, int]
) -> None:
    writer = open_writer(**changes)
    for i in range(100):
        writer.submit(record(i))
    assert writer.close() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["audit.jsonl"]
    assert len(lines_of(tmp_path / "audit.jsonl")) == 100


def test_daily_rotation_moves_yesterdays_file_aside_without_deleting(
    tmp_path: Path, open_writer: Callable[..., AuditWriter]
) -> None:
    path = tmp_path / "audit.jsonl"
    old = datetime.now(timezone.utc) - timedelta(days=2)
    path.write_text(record(1).to_line(), encoding="utf-8")
    os.utime(path, (old.timestamp(), old.timestamp()))
    # A file already named for that day (a restart, a clock step) must survive too.
    same_day = tmp_path / f"audit.jsonl.{old:%Y-%m-%d}"
    same_day.write_text(record(0).to_line(), encoding="utf-8")
    writer = open_writer(rotate_daily=True, backup_count=7)
    writer.submit(record(2))
    assert writer.close() == 0
    assert request_ids(lines_of(same_day)) == ["req-000000"]
    moved = tmp_path / f"audit.jsonl.{old:%Y-%m-%d}.1"
    assert request_ids(lines_of(moved)) == ["req-000001"]
    assert request_ids(lines_of(path)) == ["req-000002"]


# -- permissions ----------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_file_is_0600_and_new_folders_0700_whatever_the_umask(
    tmp_path: Path, open_writer: Callable[..., AuditWriter], umask: int
) -> None:
    path = tmp_path / "a" / "b" / "audit.jsonl"
    previous = os.umask(umask)
    try:
        writer = open_writer(path=path, max_bytes=600, backup_count=5)
        for i in range(4):  # enough to rotate: rotated files keep the mode
            writer.submit(record(i))
        assert writer.close() == 0
    finally:
        os.umask(previous)
    assert os.umask(previous) == previous  # the writer left the umask alone
    for folder in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    files = sorted(path.parent.iterdir())
    assert len(files) > 1
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_existing_folder_keeps_its_mode(tmp_path: Path, open_writer: Callable[..., AuditWriter]) -> None:
    tmp_path.chmod(0o755)
    writer = open_writer()
    writer.submit(record())
    assert writer.close() == 0
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


# -- reopen and reconfigure -----------------------------------------------------------


def test_reopen_after_logrotate_renamed_the_file(
    tmp_path: Path, open_writer: Callable[..., AuditWriter]
) -> None:
    path = tmp_path / "audit.jsonl"
    writer = open_writer()
    writer.submit(record(1))
    wait_for(lambda: writer.written == 1, "the first line")
    path.rename(tmp_path / "audit.jsonl.1")  # logrotate moves it, then sends SIGUSR1
    writer.reopen()
    writer.submit(record(2))
    assert writer.close() == 0
    assert request_ids(lines_of(tmp_path / "audit.jsonl.1")) == ["req-000001"]
    assert request_ids(lines_of(path)) == ["req-000002"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_without_reopen_lines_follow_the_renamed_file(
    tmp_path: Path, open_writer: Callable[..., AuditWriter]
) -> None:
    # The counterpart of the test above, showing that reopen() is what made the difference.
    writer = open_writer()
    writer.submit(record(1))
    wait_for(lambda: writer.written == 1, "the first line")
    (tmp_path / "audit.jsonl").rename(tmp_path / "moved")
    writer.submit(record(2))
    assert writer.close() == 0
    assert request_ids(lines_of(tmp_path / "moved")) == ["req-000001", "req-000002"]
    assert not (tmp_path / "audit.jsonl").exists()


def test_reconfigure_switches_file_without_losing_a_line(
    tmp_path: Path, open_writer: Callable[..., AuditWriter]
) -> None:
    writer = open_writer()
    for i in range(3):
        writer.submit(record(i))
    wait_for(lambda: writer.written == 3, "the first lines")
    new = AuditSettings(path=tmp_path / "new" / "audit.jsonl", queue_size=5, on_failure="reject")
    writer.reconfigure(new)
    assert writer.settings is new
    for i in range(3, 6):
        writer.submit(record(i))
    assert writer.close() == 0
    assert request_ids(lines_of(tmp_path / "audit.jsonl")) == [f"req-{i:06d}" for i in range(3)]
    assert request_ids(lines_of(new.path)) == [f"req-{i:06d}" for i in range(3, 6)]


def test_reconfigure_resizes_the_queue(open_writer: Callable[..., AuditWriter], tmp_path: Path) -> None:
    writer = open_writer(start=False, queue_size=2)
    writer.reconfigure(AuditSettings(path=tmp_path / "audit.jsonl", queue_size=4))
    assert [writer.submit(record(i)) for i in range(5)] == [True] * 4 + [False]


# -- a failing disk -------------------------------------------------------------------


def block_with_file(path: Path) -> Callable[[], None]:
    path.parent.write_text("not a folder")  # root can't write through a regular file

    def repair() -> None:
        path.parent.unlink()

    return repair


def block_with_folder(path: Path) -> Callable[[], None]:
    path.mkdir(parents=True)  # a folder where the file should be

    def repair() -> None:
        path.rmdir()

    return repair


@pytest.mark.parametrize("block", [block_with_file, block_with_folder])
def test_disk_failure_keeps_lines_reports_once_and_recovers(
    tmp_path: Path,
    open_writer: Callable[..., AuditWriter],
    block: Callable[[Path], Callable[[], None]],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    quick_retries: None,
) -> None:
    monkeypatch.setattr(audit, "REPORT_INTERVAL", 3600.0)
    caplog.set_level(logging.INFO, logger="skyproxy.audit")
    path = tmp_path / "var" / "audit.jsonl"
    repair = block(path)
    writer = open_writer(path=path, on_failure="reject")
    records = [record(i) for i in range(10)]
    for r in records:
        assert writer.submit(r)
    wait_for(lambda: writer.write_failures >= 3, "repeated failures")
    assert not writer.healthy
    assert writer.reject_new
    assert writer.written == 0
    assert writer.dropped == 0
    errors = [r for r in caplog.records if r.name == "skyproxy.audit" and r.levelno == logging.ERROR]
    assert len(errors) == 1  # reported once, not once per retry
    assert str(path) in errors[0].getMessage()
    assert "failed attempts" in errors[0].getMessage()

    repair()
    wait_for(lambda: writer.healthy, "recovery")
    assert not writer.reject_new
    writer.submit(record(10))
    assert writer.close() == 0
    assert lines_of(path) == [r.to_line() for r in [*records, record(10)]]
    assert any("writable again" in r.getMessage() for r in caplog.records)


def test_continue_mode_never_rejects(
    tmp_path: Path, open_writer: Callable[..., AuditWriter], quick_retries: None
) -> None:
    path = tmp_path / "var" / "audit.jsonl"
    block_with_file(path)
    writer = open_writer(path=path, on_failure="continue")
    wait_for(lambda: writer.write_failures >= 1, "a failure")  # found at start, no line needed
    assert not writer.healthy
    assert not writer.reject_new


def test_close_counts_the_lines_a_broken_disk_never_took(
    tmp_path: Path, open_writer: Callable[..., AuditWriter], quick_retries: None
) -> None:
    path = tmp_path / "var" / "audit.jsonl"
    block_with_file(path)
    writer = open_writer(path=path)
    for i in range(7):
        assert writer.submit(record(i))
    assert writer.close(timeout=0.2) == 7
    assert writer.written == 0
