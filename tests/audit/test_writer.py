"""The audit writer against real files: order, drain, queue limits, reopen, failures."""

from __future__ import annotations

import json
import logging
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.audit import lines_of, record, request_ids, wait_for

from skyproxy.audit import writer as audit
from skyproxy.audit.writer import AuditWriter
from skyproxy.config import AuditSettings

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
