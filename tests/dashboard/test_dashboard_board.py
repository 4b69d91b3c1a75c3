"""The dashboard's history: built from real audit files, then kept up line by line."""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import pytest

from skyproxy.audit.record import AuditRecord
from skyproxy.dashboard import lines
from skyproxy.dashboard.board import Board
from skyproxy.dashboard.spend import Spend, day_start, month_start
from skyproxy.dashboard.tail import AuditTail
from skyproxy.dashboard.traffic import Bucket, Traffic
from skyproxy.ops.metrics import Metrics


def line(
    moment: float, status: str = "created", user: str = "alice", pid: str | None = "p1", **kw: object
) -> bytes:
    fields: dict = {
        "environment": "dev",
        "userId": user,
        "predictionId": pid,
        "model": "flux",
        "status": status,
        "httpStatus": 201,
        "latencyMs": 120.0,
        "costUsd": 0.5,
        "ipAddress": "127.0.0.1",
        "requestId": "r",
        "keyFingerprint": "ab..cd",
        "method": "POST",
        "path": "/v1/predictions",
    }
    fields.update(kw)
    return AuditRecord(timestamp=moment, **fields).to_bytes()


def test_the_tail_follows_appends_partial_lines_and_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    tail = AuditTail(path)
    assert tail.read() == []  # no file yet
    path.write_bytes(b'{"a":1}\n{"b":')
    assert tail.read() == [b'{"a":1}']
    with path.open("ab") as f:
        f.write(b"2}\n")
    assert tail.read() == [b'{"b":2}']
    with path.open("ab") as f:
        f.write(b'{"c":3}\n')
    os.rename(path, tmp_path / "audit.jsonl.1")  # rotated before the tail saw its last line
    path.write_bytes(b'{"d":4}\n')
    assert tail.read() == [b'{"c":3}', b'{"d":4}']
    path.write_bytes(b"")  # logrotate's copytruncate
    assert tail.read() == []
    path.write_bytes(b'{"e":5}\n')
    assert tail.read() == [b'{"e":5}']
    tail.close()


def test_spend_counts_each_prediction_once_by_every_dimension() -> None:
    now = time.time()
    spend = Spend(now)
    cell = ("dev", "alice", "flux", "backend")
    spend.observe(now, cell, "created", "p1", 0.5)  # the estimate
    spend.observe(now, cell, "succeeded", "p1", 0.75)  # the final cost replaces it
    spend.observe(now, ("dev", "bob", "flux", None), "created", "p2", 0.25)
    doc = spend.document(now)
    today = doc["today"]
    assert today["usd"] == 1.0
    assert today["by"]["user"] == [{"key": "alice", "usd": 0.75}, {"key": "bob", "usd": 0.25}]
    assert today["by"]["client"] == [{"key": "backend", "usd": 0.75}, {"key": None, "usd": 0.25}]
    assert today["by"]["environment"] == [{"key": "dev", "usd": 1.0}]
    assert doc["month"]["usd"] == 1.0


def test_a_new_day_starts_from_zero_but_the_month_goes_on() -> None:
    start = month_start(time.time()) + 3600  # the first day of this month, 01:00 UTC
    spend = Spend(start)
    spend.observe(start, ("dev", "alice", "flux", None), "created", "p1", 1.0)
    tomorrow = day_start(start) + 86400 + 60
    spend.observe(tomorrow, ("dev", "alice", "flux", None), "created", "p2", 2.0)
    doc = spend.document(tomorrow)
    assert doc["today"]["usd"] == 2.0 and doc["month"]["usd"] == 3.0


def test_the_board_builds_from_rotated_files_then_takes_new_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    # Far enough into the UTC day that the lines two minutes back are today's too: run
    # just after midnight, "today" would otherwise hold only some of them.
    now = max(time.time(), day_start(time.time()) + 300)
    with gzip.open(tmp_path / "audit.jsonl.2.gz", "wb") as f:
        f.write(line(now - 120, pid="p0", user="old"))
    (tmp_path / "audit.jsonl.1").write_bytes(line(now - 60, pid="p1") + b"not json\n")
    path.write_bytes(line(now - 30, pid="p2", user="bob"))
    board = Board(path, Metrics(), now=now)
    board.build()
    assert board.built and board.lines == 3
    assert [p["predictionId"] for p in board.predictions()] == ["p2", "p1", "p0"]
    assert board.spend.document(now)["today"]["usd"] == 1.5
    with path.open("ab") as f:
        f.write(line(now + 1, status="succeeded", pid="p2", user="bob", costUsd=2.0))
        f.write(b'{"event":"prediction","timestamp":3}\n')
    assert board.refresh() == 2
    assert board.bad_lines == 2  # "not json" in the rotated file, and the line without a usable timestamp
    assert board.predictions()[0]["status"] == "succeeded"
    assert board.spend.document(now + 1)["today"]["usd"] == 3.0  # p2's estimate replaced
    board.close()


def test_traffic_before_the_start_comes_from_the_audit_trail(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    now = time.time()
    path.write_bytes(line(now - 90, pid="a") + line(now - 30, pid="b", httpStatus=429, latencyMs=None))
    board = Board(path, Metrics(), now=now)
    board.build()
    board.take_seed()
    short = board.traffic.document("15m", now)
    assert sum(short["4xx"]) == 1 and sum(short["2xx"]) == 1  # type: ignore[arg-type]
    long = board.traffic.document("24h", now)
    assert sum(long["2xx"]) + sum(long["4xx"]) == 2  # type: ignore[arg-type]
    board.close()


def test_lines_without_a_cost_still_count_in_the_traffic_built_at_startup(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    now = time.time()
    refused = line(now - 30, pid=None, status="rejected", httpStatus=429, costUsd=None, latencyMs=None)
    path.write_bytes(refused * 120)  # more than the recent list holds: most are read for traffic only
    board = Board(path, Metrics(), now=now)
    board.build()
    board.take_seed()
    assert sum(board.traffic.document("15m", now)["4xx"]) == 120  # type: ignore[arg-type]
    assert board.lines == 120 and board.bad_lines == 0
    board.close()


def test_lines_after_the_start_without_a_cost_are_counted_unread(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    now = time.time()
    board = Board(path, Metrics(), now=now)
    board.build()
    path.write_bytes(line(now + 1, pid=None, costUsd=None) * 120 + line(now + 1, pid="p9"))
    assert board.refresh() == 121
    assert board.lines == 121 and board.spend.document(now + 1)["today"]["usd"] == 0.5
    assert len(board.predictions()) == 50
    board.close()


def test_live_traffic_is_the_counters_movement_each_second() -> None:
    metrics = Metrics()
    traffic = Traffic(metrics)
    now = float(int(time.time()))
    for status in (200, 200, 404, 502):
        metrics.request("dev", "/v1/predictions", status)
    metrics.latency("dev", 0.2)
    metrics.rejected("burst", "user")
    metrics.rejected("burst", "user")
    metrics.upstream_unauthorized("dev")
    traffic.sample(now)
    doc = traffic.document("15m", now + 0.5)
    assert doc["t"][-1] == now - 1  # type: ignore[index]
    assert (doc["2xx"][-1], doc["4xx"][-1], doc["5xx"][-1], doc["rps"][-1]) == (2, 1, 1, 4)  # type: ignore[index]
    assert 100 < doc["p50"][-1] <= 250  # type: ignore[index,operator]
    assert doc["rejected_total"] == {"burst": 2}
    assert traffic.rejected_total == {"burst": 2}
    assert traffic.last_401 == {"dev": now}
    traffic.sample(now + 1)  # nothing moved: nothing kept
    assert list(traffic.short) == [int(now) - 1] and list(traffic.long) == [(int(now) - 1) // 60 * 60]
    doc = traffic.document("15m", now + 1.5)
    assert doc["rps"][-1] == 0  # type: ignore[index]
    assert traffic.last_401 == {"dev": now}


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"event":"other"}',
        b'{"event":"prediction"}',
        line(0, costUsd=True),  # a bool is no number
        line(0, costUsd="1"),
        line(0).replace(b'"userId":"alice"', b'"userId":["alice"]'),
        line(0).replace(b'"timestamp":"', b'"timestamp":"x'),
        line(0).replace(b'"status":"created"', b'"status":7'),
    ],
)
def test_a_damaged_line_is_skipped(raw: bytes) -> None:
    assert lines.read(raw) is None


def test_a_line_is_read_as_written() -> None:
    moment = 1_796_000_000.25
    found = lines.read(line(moment, client="backend", userId="zoë\\x"))
    assert found is not None
    assert found.moment == moment and found.user == "zoë\\x" and found.client == "backend"
    assert (found.cost, found.latency_ms, found.http_status) == (0.5, 120.0, 201)


def test_the_tail_reads_every_file_rotated_while_nobody_read(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"a":1}\n')
    tail = AuditTail(path)
    assert tail.read() == [b'{"a":1}']
    with path.open("ab") as f:
        f.write(b'{"a":2}\n')
    os.rename(path, tmp_path / "audit.jsonl.1")
    path.write_bytes(b'{"b":1}\n')
    os.rename(tmp_path / "audit.jsonl.1", tmp_path / "audit.jsonl.2")  # rotated twice meanwhile
    os.rename(path, tmp_path / "audit.jsonl.1")
    path.write_bytes(b'{"c":1}\n')
    assert tail.read() == [b'{"a":2}', b'{"b":1}', b'{"c":1}']
    assert tail.read() == []
    tail.close()


def test_a_point_already_shown_shows_what_was_added_to_it_since() -> None:
    traffic = Traffic(Metrics())
    now = 1_796_000_000.5
    second = int(now) - 1
    bucket = Bucket()
    bucket.request(201, 0.1)
    traffic.short[second] = bucket
    first = traffic.document("15m", now)
    assert first["2xx"][-1] == 1 and first["rps"][-1] == 1.0  # type: ignore[index]
    late = Bucket()
    late.request(503, 0.9)
    bucket.add(late)  # a seeded or late count for the same second
    bucket.request(429, None)
    doc = traffic.document("15m", now)
    assert (doc["2xx"][-1], doc["4xx"][-1], doc["5xx"][-1], doc["rps"][-1]) == (1, 1, 1, 3.0)  # type: ignore[index]
    assert doc["p95"][-1] != first["p95"][-1]  # type: ignore[index]
