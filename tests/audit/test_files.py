"""The audit files: rotation by size and by day, and private modes, through the writer."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from helpers.audit import lines_of, record, request_ids

from skyproxy.audit.files import AuditFile
from skyproxy.audit.writer import AuditWriter
from skyproxy.config import AuditSettings

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


# -- the file itself: one descriptor, opened by us ---------------------------------------


def descriptors_under(folder: Path) -> list[Path]:
    """The files this process holds open inside `folder`."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = Path(os.readlink(fd))
        except OSError:  # closed while we looked (the listing's own descriptor)
            continue
        if target.parent == folder:
            found.append(target)
    return found


def lines(start: int, count: int) -> list[bytes]:
    return [record(i).to_bytes() for i in range(start, start + count)]


def test_rollovers_by_size_keep_one_descriptor_on_the_current_file(tmp_path: Path) -> None:
    # The handlers only rename and prune: were the standard library to open the file
    # itself in doRollover, a second descriptor (with the umask's mode) would show here.
    previous = os.umask(0)
    try:
        audit_file = AuditFile(AuditSettings(path=tmp_path / "audit.jsonl", max_bytes=600, backup_count=3))
        for start in range(0, 12, 3):
            batch = lines(start, 3)
            audit_file.write(batch)
            assert batch == []  # everything written is taken off the list
            assert descriptors_under(tmp_path) == [tmp_path / "audit.jsonl"]
    finally:
        os.umask(previous)
    audit_file.close()
    assert descriptors_under(tmp_path) == []
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in tmp_path.iterdir())


def test_a_daily_rollover_keeps_one_descriptor_and_a_private_fresh_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    old = datetime.now(timezone.utc) - timedelta(days=2)
    path.write_bytes(record(1).to_bytes())
    path.chmod(0o600)
    os.utime(path, (old.timestamp(), old.timestamp()))
    previous = os.umask(0)
    try:
        audit_file = AuditFile(AuditSettings(path=path, rotate_daily=True, backup_count=7))
        audit_file.write(lines(2, 1))
        assert descriptors_under(tmp_path) == [path]
    finally:
        os.umask(previous)
    audit_file.close()
    moved = tmp_path / f"audit.jsonl.{old:%Y-%m-%d}"
    assert request_ids(lines_of(moved)) == ["req-000001"]
    assert request_ids(lines_of(path)) == ["req-000002"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_failed_open_leaves_the_lines_for_the_retry(tmp_path: Path) -> None:
    path = tmp_path / "var" / "audit.jsonl"
    path.parent.write_text("not a folder")
    audit_file = AuditFile(AuditSettings(path=path))
    batch = lines(0, 3)
    with pytest.raises(OSError):
        audit_file.write(batch)
    assert len(batch) == 3
    path.parent.unlink()
    audit_file.write(batch)
    assert batch == []
    audit_file.close()
    assert request_ids(lines_of(path)) == ["req-000000", "req-000001", "req-000002"]
