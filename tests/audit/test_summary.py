"""`audit summary` over real audit files: grouping, --since, rotation, bad lines, output."""

from __future__ import annotations

import gzip
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from skyproxy.audit.record import AuditRecord
from skyproxy.audit.summary import (
    Row,
    Summary,
    audit_files,
    format_table,
    parse_since,
    summarize,
    to_json,
)

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)


def line(
    status: str,
    pid: str | None,
    *,
    user: str | None = "alice",
    model: str | None = "truefusion-pro",
    env: str = "production",
    latency: float | None = 100.0,
    cost: float | None = None,
    ago: timedelta = timedelta(minutes=5),
) -> str:
    return AuditRecord(
        timestamp=(NOW - ago).timestamp(),
        environment=env,
        userId=user,
        predictionId=pid,
        model=model,
        status=status,
        httpStatus={"rejected": 429, "failed": 500}.get(status, 200),
        latencyMs=latency,
        costUsd=cost,
        ipAddress="127.0.0.1",
        requestId="req",
        keyFingerprint="sk-…ab12",
        method="POST" if status == "created" else "GET",
        path="/v1/predictions",
    ).to_line()


# alice: p1 created then succeeded with a real cost; p2 created then failed without one;
# one rejected request. bob: a create the upstream refused (no id); p3 created, canceled.
DAY = [
    line("created", "p1", latency=100, cost=0.03),
    line("succeeded", "p1", latency=50, cost=0.05),
    line("created", "p2", latency=200, cost=0.03, model="flux"),
    line("failed", "p2", latency=30, model="flux", env="staging"),
    line("rejected", None, latency=None),
    line("failed", None, user="bob", latency=500, env="staging"),
    line("created", "p3", user="bob", latency=300, cost=0.03),
    line("canceled", "p3", user="bob", latency=None, cost=0.01),
]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(lines), encoding="utf-8")
    return path


def as_dict(row: Row) -> dict[str, Any]:
    return {
        "key": row.key,
        "predictions": row.predictions,
        "failed": row.failed,
        "rejected": row.rejected,
        "p50": row.p50_ms,
        "p95": row.p95_ms,
        "cost": round(row.cost_usd, 6),
    }


def rows_by_key(summary: Summary) -> dict[str | None, dict[str, Any]]:
    return {row.key: as_dict(row) for row in summary.rows}


# -- files ----------------------------------------------------------------------------


def test_audit_files_finds_current_and_rotated_oldest_first(tmp_path: Path) -> None:
    names = [
        "audit.jsonl",
        "audit.jsonl.1",
        "audit.jsonl.2",
        "audit.jsonl.10",
        "audit.jsonl.3.gz",
        "audit.jsonl.4",
        "audit.jsonl.4.gz",  # being compressed: read once, plain
        "audit.jsonl.2026-11-25",
        "audit.jsonl.2026-11-24.gz",
        "audit.jsonl.2026-11-25.1",
        "audit.jsonl-20261120.gz",
        # not ours:
        "audit.jsonl.tmp",
        "audit.jsonlx",
        "other.jsonl.1",
        "audit.jsonl.1.swp",
    ]
    for name in names:
        (tmp_path / name).write_text("")
    (tmp_path / "audit.jsonl.5").mkdir()  # not a file
    found = [p.name for p in audit_files(tmp_path / "audit.jsonl")]
    assert found == [
        "audit.jsonl-20261120.gz",
        "audit.jsonl.2026-11-24.gz",
        "audit.jsonl.2026-11-25",
        "audit.jsonl.2026-11-25.1",
        "audit.jsonl.10",
        "audit.jsonl.4",
        "audit.jsonl.3.gz",
        "audit.jsonl.2",
        "audit.jsonl.1",
        "audit.jsonl",
    ]


def test_audit_files_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    assert audit_files(tmp_path / "nowhere" / "audit.jsonl") == []


# -- --since --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW - timedelta(minutes=30)),
        ("1h", NOW - timedelta(hours=1)),
        (" 1d ", NOW - timedelta(days=1)),
        ("2w", NOW - timedelta(weeks=2)),
        ("2026-11-25T10:00:00Z", datetime(2026, 11, 25, 10, tzinfo=timezone.utc)),
        ("2026-11-25T10:00:00", datetime(2026, 11, 25, 10, tzinfo=timezone.utc)),
        ("2026-11-25T12:00:00+02:00", datetime(2026, 11, 25, 10, tzinfo=timezone.utc)),
        ("2026-11-25T10:00:00.250Z", datetime(2026, 11, 25, 10, 0, 0, 250000, timezone.utc)),
        ("2026-11-25", datetime(2026, 11, 25, tzinfo=timezone.utc)),
    ],
)
def test_parse_since(text: str, expected: datetime) -> None:
    parsed = parse_since(text, NOW)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


def test_parse_since_treats_a_naive_now_as_utc() -> None:
    assert parse_since("1h", NOW.replace(tzinfo=None)) == NOW - timedelta(hours=1)


@pytest.mark.parametrize("text", ["", "1y", "-1h", "1.5h", "h", "yesterday", "1 hour", "1H"])
def test_parse_since_rejects_anything_else_clearly(text: str) -> None:
    with pytest.raises(ValueError, match=r"is neither a duration such as 30m, 1h, 1d or 2w, nor an ISO 8601"):
        parse_since(text, NOW)


# -- grouping and counting ------------------------------------------------------------


def test_by_user(tmp_path: Path) -> None:
    summary = summarize([write(tmp_path / "audit.jsonl", DAY)], None, "user")
    assert [as_dict(r) for r in summary.rows] == [
        # p1 and p2; p2 failed; the rejected request; latencies 30 50 100 200;
        # p1's real cost replaces its estimate, p2 keeps its estimate.
        {
            "key": "alice",
            "predictions": 2,
            "failed": 1,
            "rejected": 1,
            "p50": 50.0,
            "p95": 200.0,
            "cost": 0.08,
        },
        # the refused create and p3; latencies 300 500; p3's cost from its canceled line.
        {
            "key": "bob",
            "predictions": 2,
            "failed": 1,
            "rejected": 0,
            "p50": 300.0,
            "p95": 500.0,
            "cost": 0.01,
        },
    ]
    assert as_dict(summary.total) == {
        "key": "TOTAL",
        "predictions": 4,
        "failed": 2,
        "rejected": 1,
        "p50": 100.0,  # of 30 50 100 200 300 500, not a mean of the rows
        "p95": 500.0,
        "cost": 0.09,
    }
    assert summary.events == len(DAY)
    assert summary.bad_lines == 0


def test_by_model(tmp_path: Path) -> None:
    summary = summarize([write(tmp_path / "audit.jsonl", DAY)], None, "model")
    rows = rows_by_key(summary)
    assert set(rows) == {"truefusion-pro", "flux"}
    assert rows["flux"] == {
        "key": "flux",
        "predictions": 1,
        "failed": 1,
        "rejected": 0,
        "p50": 30.0,
        "p95": 200.0,
        "cost": 0.03,
    }
    assert rows["truefusion-pro"]["predictions"] == 3
    assert rows["truefusion-pro"]["rejected"] == 1
    assert rows["truefusion-pro"]["cost"] == 0.06


def test_by_environment(tmp_path: Path) -> None:
    summary = summarize([write(tmp_path / "audit.jsonl", DAY)], None, "environment")
    rows = rows_by_key(summary)
    assert set(rows) == {"production", "staging"}
    # staging holds p2's failed line (p2 was created in production) and bob's refused create.
    assert rows["staging"]["predictions"] == 1
    assert rows["staging"]["failed"] == 2
    assert rows["production"]["predictions"] == 3
    assert rows["production"]["cost"] == 0.09


def test_by_status(tmp_path: Path) -> None:
    summary = summarize([write(tmp_path / "audit.jsonl", DAY)], None, "status")
    rows = rows_by_key(summary)
    assert {k: (r["predictions"], r["failed"], r["rejected"]) for k, r in rows.items()} == {
        "created": (3, 0, 0),
        "failed": (1, 2, 0),  # the refused create is a prediction; p2's failure is not again
        "rejected": (0, 0, 1),
        "succeeded": (0, 0, 0),
        "canceled": (0, 0, 0),
    }
    # Each cost sits where it was taken from: p1 real, p2 estimated, p3 real.
    assert {k: r["cost"] for k, r in rows.items()} == {
        "created": 0.03,
        "failed": 0.0,
        "rejected": 0.0,
        "succeeded": 0.05,
        "canceled": 0.01,
    }


@pytest.mark.parametrize(
    ("latencies", "p50", "p95"),
    [
        ([50, 10, 40, 20, 30], 30.0, 50.0),
        (list(range(1, 101)), 50.0, 95.0),  # nearest rank, not interpolated (50.5, 95.05)
        ([7], 7.0, 7.0),
    ],
)
def test_percentiles_are_nearest_rank(tmp_path: Path, latencies: list[int], p50: float, p95: float) -> None:
    lines = [line("created", f"p{i}", latency=v) for i, v in enumerate(latencies)]
    lines.append(line("rejected", None, latency=None))  # no latency: not part of it
    summary = summarize([write(tmp_path / "audit.jsonl", lines)], None, "user")
    assert (summary.total.p50_ms, summary.total.p95_ms) == (p50, p95)


def test_unknown_group_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid --by 'ip'"):
        summarize([], None, "ip")


def test_null_keys_form_their_own_group(tmp_path: Path) -> None:
    path = write(tmp_path / "audit.jsonl", [line("created", "p1", user=None)])
    summary = summarize([path], None, "user")
    assert [row.key for row in summary.rows] == [None]
    assert "\n-  " in format_table(summary)


def test_cost_is_counted_once_per_prediction(tmp_path: Path) -> None:
    path = write(
        tmp_path / "audit.jsonl",
        [
            line("created", "p1", cost=0.03),
            line("succeeded", "p1", cost=0.05),
            line("succeeded", "p1", cost=0.05),  # logged twice: still one prediction
            line("created", "p2", cost=0.03),
            line("failed", "p2", cost=None),  # no real cost: the estimate stands
            line("failed", "p2", cost=None),
            line("created", "p3", cost=None),
            line("succeeded", "p3", cost=0.2),
        ],
    )
    summary = summarize([path], None, "user")
    assert summary.total.cost_usd == pytest.approx(0.05 + 0.03 + 0.2)
    assert summary.total.predictions == 3
    assert summary.total.failed == 1


# -- --since --------------------------------------------------------------------------


def test_since_counts_only_later_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path / "audit.jsonl",
        [
            line("created", "old", ago=timedelta(hours=3), cost=0.5),
            line("rejected", None, ago=timedelta(hours=2)),
            line("created", "edge", ago=timedelta(hours=1), cost=0.01),  # exactly at --since
            line("failed", "old", ago=timedelta(minutes=10)),  # a late failure of an old one
            line("created", "new", ago=timedelta(minutes=1), cost=0.02),
        ],
    )
    summary = summarize([path], parse_since("1h", NOW), "user")
    assert as_dict(summary.total) | {"p50": None, "p95": None} == {
        "key": "TOTAL",
        "predictions": 2,  # edge and new; old's failure is not taken for a create
        "failed": 1,
        "rejected": 0,
        "p50": None,
        "p95": None,
        "cost": 0.03,
    }
    assert summary.events == 3
    everything = summarize([path], None, "user")
    assert everything.total.predictions == 3
    assert everything.total.rejected == 1


# -- rotated and damaged files --------------------------------------------------------


def test_rotated_and_gzipped_files_are_read(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with gzip.open(tmp_path / "audit.jsonl.2026-11-25.gz", "wt", encoding="utf-8") as f:
        f.writelines(DAY[:2])
    with gzip.open(tmp_path / "audit.jsonl.1.gz", "wt", encoding="utf-8") as f:
        f.writelines(DAY[2:5])
    write(tmp_path / "audit.jsonl.2", DAY[5:7])
    write(path, DAY[7:])
    files = audit_files(path)
    assert len(files) == 4
    summary = summarize(files, None, "user")
    whole = summarize([write(tmp_path / "all", DAY)], None, "user")
    assert [as_dict(r) for r in summary.rows] == [as_dict(r) for r in whole.rows]
    assert summary.events == len(DAY)
    assert summary.files == files


def test_bad_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    good = line("created", "p1", cost=0.03)
    missing_status = json.loads(good)
    del missing_status["status"]
    bad = [
        "not json\n",
        "[1, 2]\n",
        "\n",
        json.dumps(missing_status) + "\n",
        good.replace('"created"', '"exploded"'),
        good.replace('"2026-11-26T', '"yesterday'),
        good.replace('"latencyMs":100.0', '"latencyMs":"fast"'),
        good.replace('"latencyMs":100.0', '"latencyMs":true'),
        good.replace('"userId":"alice"', '"userId":42'),
        good[: len(good) // 2],  # a torn last line
    ]
    other_event = json.dumps({"event": "key_rotated", "environment": "production"}) + "\n"
    path = tmp_path / "audit.jsonl"
    path.write_bytes(
        "".join([good, *bad[:-1], other_event]).encode()
        + b'{"userId":"\xff\xfe"}\n'  # not UTF-8
        + bad[-1].encode()
    )
    summary = summarize([path], None, "user")
    assert summary.bad_lines == len(bad) + 1
    assert summary.events == 1  # the good line; the other event is ignored, not bad
    assert summary.total.predictions == 1


def test_a_truncated_gzip_keeps_what_it_could_read(tmp_path: Path) -> None:
    lines = [line("created", f"p{i}", ago=timedelta(seconds=i)) for i in range(2000)]
    packed = gzip.compress("".join(lines).encode())
    rotated = tmp_path / "audit.jsonl.1.gz"
    rotated.write_bytes(packed[: len(packed) * 2 // 3])
    current = write(tmp_path / "audit.jsonl", [line("rejected", None)])
    summary = summarize(audit_files(tmp_path / "audit.jsonl"), None, "user")
    assert summary.bad_lines == 1
    assert 0 < summary.total.predictions < 2000
    assert summary.total.rejected == 1  # the files after it are still read
    assert summary.files == [rotated, current]


def test_no_files_give_an_empty_summary() -> None:
    summary = summarize([], None, "model")
    assert summary.rows == []
    assert summary.total.predictions == 0
    assert summary.total.p50_ms is None
    table = format_table(summary)
    assert table.splitlines()[0].split() == [
        "MODEL",
        "PREDICTIONS",
        "FAILED",
        "REJECTED",
        "P50_MS",
        "P95_MS",
        "COST_USD",
    ]
    assert "no prediction events" in table


# -- output ---------------------------------------------------------------------------


def test_table_columns_line_up(tmp_path: Path) -> None:
    lines = [
        *DAY,
        line("created", "p9", user="a-much-longer-user-name", latency=123456.7, cost=12.5),
        "garbage\n",
    ]
    summary = summarize([write(tmp_path / "audit.jsonl", lines)], None, "user")
    table = format_table(summary)
    rows = table.splitlines()
    header, body, note = rows[0], rows[1:-1], rows[-1]
    assert header.split() == [
        "USER",
        "PREDICTIONS",
        "FAILED",
        "REJECTED",
        "P50_MS",
        "P95_MS",
        "COST_USD",
    ]
    assert [row.split()[0] for row in body] == ["alice", "bob", "a-much-longer-user-name", "TOTAL"]
    header_cells = list(re.finditer(r"\S+", header))
    for row in body:
        cells = list(re.finditer(r"\S+", row))
        assert len(cells) == 7, row
        assert cells[0].start() == 0
        # Numbers are right-aligned under their headings.
        assert [c.end() for c in cells[1:]] == [c.end() for c in header_cells[1:]], row
    assert body[0].split()[1:] == ["2", "1", "1", "50.0", "200.0", "0.0800"]
    assert body[2].split()[4:] == ["123456.7", "123456.7", "12.5000"]
    assert note == "skipped 1 bad line (not JSON or missing fields)"


def test_table_has_no_note_without_bad_lines(tmp_path: Path) -> None:
    summary = summarize([write(tmp_path / "audit.jsonl", DAY)], None, "user")
    assert format_table(summary).splitlines()[-1].startswith("TOTAL")


def test_table_escapes_control_characters_in_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "audit.jsonl", [line("created", "p1", user="evil\x1b[2J\rname")])
    table = format_table(summarize([path], None, "user"))
    assert "\x1b" not in table
    assert "\r" not in table
    assert "evil\\x1b[2J\\rname" in table


def test_json_output(tmp_path: Path) -> None:
    path = write(tmp_path / "audit.jsonl", [*DAY, "garbage\n"])
    since = parse_since("1d", NOW)
    data = to_json(summarize([path], since, "user"))
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
    assert data == {
        "by": "user",
        "since": "2026-11-25T12:00:00.000Z",
        "files": [str(path)],
        "events": len(DAY),
        "badLines": 1,
        "groups": [
            {
                "key": "alice",
                "predictions": 2,
                "failed": 1,
                "rejected": 1,
                "p50Ms": 50.0,
                "p95Ms": 200.0,
                "costUsd": 0.08,
            },
            {
                "key": "bob",
                "predictions": 2,
                "failed": 1,
                "rejected": 0,
                "p50Ms": 300.0,
                "p95Ms": 500.0,
                "costUsd": 0.01,
            },
        ],
        "total": {
            "key": None,
            "predictions": 4,
            "failed": 2,
            "rejected": 1,
            "p50Ms": 100.0,
            "p95Ms": 500.0,
            "costUsd": 0.09,
        },
    }
