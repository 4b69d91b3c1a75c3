"""A full disk: the writer keeps every accepted line, writes whole lines as space allows,
counts its backlog, and catches up once space returns, in order."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Proxy, env_config
from helpers.audit import record, request_ids, wait_for
from helpers.daemon import audit_lines, create, eventually
from helpers.disks import CappedWriter, append_only, mount_tmpfs, resize_tmpfs, unmount
from prometheus_client.parser import text_string_to_metric_families

from skyproxy.audit import writer as audit
from skyproxy.audit.writer import AuditWriter

LINE = len(record(0).to_bytes())


def whole_lines(path: Path) -> list[str]:
    """The file's lines, after checking that it ends at a line boundary and each parses."""
    raw = path.read_bytes()
    assert raw.endswith(b"\n") or not raw, f"the file ends inside a line: {raw[-80:]!r}"
    lines = raw.decode().splitlines(keepends=True)
    for line in lines:
        json.loads(line)
    return lines


def assert_whole_lines_fill(path: Path, room: int) -> int:
    """Checks that the file holds the first lines in order, as many whole ones as fit."""
    ids = request_ids(whole_lines(path))
    assert len(ids) == room // LINE
    assert ids == [f"req-{i:06d}" for i in range(len(ids))]
    return len(ids)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, 24 KiB of it taken by a filler file that can be shrunk later."""
    folder = tmp_path / "disk"
    reason = mount_tmpfs(folder, 64 * 1024)
    if reason:
        pytest.skip(f"{reason}; test_writer_catches_up_as_the_file_size_limit_rises covers this")
    (folder / "filler").write_bytes(b"\0" * 24 * 1024)
    try:
        yield folder
    finally:
        unmount(folder)


def test_writer_catches_up_as_space_returns_on_a_full_tmpfs(
    tmpfs: Path,
    open_writer: Callable[..., AuditWriter],
    quick_retries: None,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(audit, "REPORT_INTERVAL", 3600.0)
    caplog.set_level(logging.INFO, logger="skyproxy.audit")
    path = tmpfs / "audit.jsonl"
    writer = open_writer(path=path, max_bytes=0, on_failure="continue")
    assert all(writer.submit(record(i)) for i in range(300))  # ~100 KiB for 40 KiB of room
    wait_for(lambda: writer.write_failures >= 2, "the disk to fill")
    assert not writer.healthy
    assert not writer.reject_new
    assert any(str(path) in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    first = assert_whole_lines_fill(path, 40 * 1024)
    assert writer.written == first
    assert writer.depth == 300 - first  # the backlog is counted
    assert all(writer.submit(record(i)) for i in range(300, 350))  # queued behind it
    assert writer.depth == 350 - first

    os.truncate(tmpfs / "filler", 16 * 1024)  # 8 KiB back: room for ~23 of the lines
    wait_for(lambda: writer.written > first, "whole lines to fill the freed space")
    second = assert_whole_lines_fill(path, 48 * 1024)
    assert writer.written == second
    assert writer.depth == 350 - second
    assert not writer.healthy

    resize_tmpfs(tmpfs, 1024 * 1024)  # all the room it needs
    wait_for(lambda: writer.healthy and writer.depth == 0, "the backlog to drain")
    assert writer.submit(record(350))
    assert writer.close() == 0
    assert request_ids(whole_lines(path)) == [f"req-{i:06d}" for i in range(351)]
    assert writer.dropped == 0


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[CappedWriter]:
    child = CappedWriter(tmp_path / "audit.jsonl", tmp_path / "child.stderr")
    try:
        yield child
    finally:
        child.stop()


def test_writer_catches_up_as_the_file_size_limit_rises(tmp_path: Path, capped: CappedWriter) -> None:
    path = tmp_path / "audit.jsonl"
    capped.ask("limit", bytes=40 * 1024)
    assert capped.ask("submit", range=[0, 300])["accepted"] == 300
    state = capped.ask("state")
    while state["write_failures"] < 2:
        state = capped.ask("state")
    assert not state["healthy"]
    first = assert_whole_lines_fill(path, 40 * 1024)
    assert state["written"] == first
    assert state["depth"] == 300 - first
    assert capped.ask("submit", range=[300, 350])["depth"] == 350 - first

    capped.ask("limit", bytes=48 * 1024)  # room for ~23 more lines
    wait_for(lambda: capped.ask("state")["written"] > first, "whole lines to fill the room")
    second = assert_whole_lines_fill(path, 48 * 1024)
    state = capped.ask("state")
    assert state["written"] == second
    assert state["depth"] == 350 - second
    assert not state["healthy"]

    capped.ask("limit", bytes=None)
    wait_for(lambda: capped.ask("state")["depth"] == 0, "the backlog to drain")
    assert capped.ask("close", timeout=10.0)["unwritten"] == 0
    assert capped.process.wait(10) == 0
    assert request_ids(whole_lines(path)) == [f"req-{i:06d}" for i in range(350)]
    assert (tmp_path / "child.stderr").read_text().count("cannot write audit file") >= 1


def test_a_line_cut_short_in_an_append_only_file_is_finished_on_the_retry(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.touch(mode=0o600)
    reason = append_only(path, True)  # ftruncate(2) is refused: the cut-off part stays
    if reason:
        pytest.skip(reason)
    child = CappedWriter(path, tmp_path / "child.stderr")
    try:
        child.ask("limit", bytes=40 * 1024)
        child.ask("submit", range=[0, 300])
        wait_for(lambda: child.ask("state")["write_failures"] >= 2, "the size limit to be hit")
        assert path.stat().st_size == 40 * 1024  # the last line in it is partial for now
        child.ask("limit", bytes=None)
        wait_for(lambda: child.ask("state")["depth"] == 0, "the backlog to drain")
        assert child.ask("close", timeout=10.0)["unwritten"] == 0
    finally:
        child.stop()
        append_only(path, False)
    assert request_ids(whole_lines(path)) == [f"req-{i:06d}" for i in range(300)]


async def test_status_and_metrics_count_the_backlog_while_the_disk_is_full(
    tmp_path: Path, mock_upstream, start_proxy, canary_env, quick_retries: None
) -> None:
    url, _ = mock_upstream
    full = tmp_path / "audit" / "audit.jsonl"
    full.parent.mkdir(mode=0o700)
    full.symlink_to("/dev/full")  # every write(2) fails with ENOSPC
    proxy = await start_proxy(env_config(url, extra='on_failure = "continue"\n[rate_limit]\nenabled = false'))
    for n in range(30):
        status, _ = await create(proxy.session, proxy.url, user=f"user-{n:02d}")
        assert status == 201
    # The line is recorded once the answer is sent, so the last one may still be on its way.
    await eventually(lambda: audit_backlog(proxy, 30), "the backlog to be counted in /-/status")
    assert await queue_depth_metric(proxy) == 30

    full.unlink()  # the writer's next retry opens a regular file there
    await eventually(lambda: audit_backlog(proxy, 0), "the backlog to reach the file")
    assert await queue_depth_metric(proxy) == 0
    assert [line["userId"] for line in audit_lines(full)] == [f"user-{n:02d}" for n in range(30)]


async def status_of(proxy: Proxy) -> dict[str, Any]:
    async with proxy.session.get(f"{proxy.url}/-/status") as r:
        assert r.status == 200
        status: dict[str, Any] = await r.json()
        return status


async def audit_backlog(proxy: Proxy, lines: int) -> bool:
    """Whether /-/status shows `lines` unwritten lines, and unhealthy while there are any."""
    audit_state = (await status_of(proxy))["audit"]
    return audit_state == {**audit_state, "queue_depth": lines, "healthy": not lines}


async def queue_depth_metric(proxy: Proxy) -> float:
    async with proxy.session.get(f"{proxy.url}/-/metrics") as r:
        text = await r.text()
    for family in text_string_to_metric_families(text):
        if family.name == "skyproxy_audit_queue_depth":
            return float(family.samples[0].value)
    raise AssertionError("no skyproxy_audit_queue_depth in /-/metrics")
