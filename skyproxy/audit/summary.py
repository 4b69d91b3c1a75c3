"""`skyproxy audit summary`: predictions, failures, latency and cost from the audit trail.

Reads the current audit file and every rotated one (gzip included). A line that is not
JSON, or lacks a field the summary needs, is skipped and counted, never fatal; lines of
another `event` are ignored.

What the columns count, per group (a user, model, environment or status):

- predictions: create attempts that reached or tried the upstream. That is every
  "created" line, plus every "failed" line that no "created" line names (a create the
  upstream refused has no prediction id); a prediction that was created and later
  failed is counted once. Rejected requests never reached the upstream and are not
  predictions.
- failed: predictions that failed, whether at create or later (each id once).
- rejected: requests skyproxy refused ("rejected" lines), such as rate-limited ones.
- p50/p95: nearest-rank percentiles of latencyMs over the lines that have one.
- cost: each prediction once: the cost on its terminal line (succeeded, failed,
  canceled) when there is one, else the estimate on its "created" line; lines without
  a prediction id add their own cost.

With --since, only lines at or after that time count, but "created" lines from before
it are still seen, so a late failure of an older prediction is not taken for a create.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from skyproxy.audit.costs import Costs
from skyproxy.audit.record import STATUSES

__all__ = [
    "GROUPS",
    "Row",
    "Summary",
    "audit_files",
    "format_table",
    "parse_since",
    "prediction_events",
    "summarize",
    "to_json",
]

GROUPS = {"user": "userId", "model": "model", "environment": "environment", "status": "status"}
_REQUIRED = (
    "timestamp",
    "environment",
    "userId",
    "predictionId",
    "model",
    "status",
    "latencyMs",
    "costUsd",
)
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 604800}


# -- files ----------------------------------------------------------------------------

# The suffixes rotation leaves: .N (by size), .YYYY-MM-DD[.N] (daily), -YYYYMMDD
# (logrotate's dateext), each possibly gzipped.
_ROTATED = re.compile(r"\.(\d+)|\.(\d{4}-\d\d-\d\d)(?:\.(\d+))?|-(\d{8})")


def audit_files(path: Path) -> list[Path]:
    """The audit file and its rotated siblings that exist, oldest first.

    Dated files come first (by date), then numbered ones (highest number first), then
    the current file. A rotated file present both plain and gzipped (mid-compression)
    is read once, plain.
    """
    found: list[tuple[tuple[int, str, int], Path]] = []
    try:
        siblings = list(path.parent.iterdir())
    except FileNotFoundError:
        return []
    names = {p.name for p in siblings}
    for sibling in siblings:
        name = sibling.name
        if name == path.name:
            found.append(((2, "", 0), sibling))
            continue
        if not name.startswith(path.name) or not sibling.is_file():
            continue
        rest = name[len(path.name) :]
        if rest.endswith(".gz"):
            rest = rest[:-3]
            if name[:-3] in names:
                continue
        match = _ROTATED.fullmatch(rest)
        if match is None:
            continue
        number, day, day_number, compact_day = match.groups()
        if number is not None:
            found.append(((1, "", -int(number)), sibling))
        else:
            date = day or f"{compact_day[:4]}-{compact_day[4:6]}-{compact_day[6:]}"
            found.append(((0, date, int(day_number or 0)), sibling))
    return [p for _, p in sorted(found, key=lambda item: item[0])]


def parse_since(text: str, now: datetime) -> datetime:
    """`30m`, `1h`, `1d`, `2w` before `now`, or an ISO 8601 time (naive means UTC)."""
    text = text.strip()
    duration = re.fullmatch(r"(\d+)([mhdw])", text)
    if duration:
        return _utc(now) - timedelta(seconds=int(duration.group(1)) * _UNITS[duration.group(2)])
    try:
        moment = datetime.fromisoformat(_plus_zero(text))
    except ValueError:
        # The caller names the option; this says only what was wrong with the value.
        raise ValueError(
            f"{text!r} is neither a duration such as 30m, 1h, 1d or 2w, "
            "nor an ISO 8601 time such as 2026-11-25T10:00:00Z"
        ) from None
    return _utc(moment)


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _plus_zero(text: str) -> str:
    # datetime.fromisoformat reads "Z" only from Python 3.11 on.
    return text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text


# -- the summary ----------------------------------------------------------------------


@dataclass(slots=True)
class Row:
    key: str | None  # the user, model, environment or status; None when the line had none
    predictions: int = 0
    failed: int = 0
    rejected: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    cost_usd: float = 0.0


@dataclass(slots=True)
class Summary:
    by: str
    since: datetime | None
    rows: list[Row]
    total: Row
    events: int = 0  # lines counted
    bad_lines: int = 0
    files: list[Path] = field(default_factory=list)


@dataclass(slots=True)
class _Group:
    predictions: int = 0
    failed: int = 0
    rejected: int = 0
    latencies: list[float] = field(default_factory=list)
    cost: float = 0.0

    def row(self, key: str | None) -> Row:
        ordered = sorted(self.latencies)
        return Row(
            key=key,
            predictions=self.predictions,
            failed=self.failed,
            rejected=self.rejected,
            p50_ms=_nearest_rank(ordered, 50),
            p95_ms=_nearest_rank(ordered, 95),
            cost_usd=self.cost,
        )


def _nearest_rank(ordered: list[float], percent: float) -> float | None:
    if not ordered:
        return None
    return ordered[max(1, math.ceil(percent / 100 * len(ordered))) - 1]


def summarize(files: Iterable[Path], since: datetime | None, by: str = "user") -> Summary:
    """Totals per group (`by`: user, model, environment or status) and overall."""
    if by not in GROUPS:
        raise ValueError(f"invalid --by {by!r}: expected one of {', '.join(GROUPS)}")
    key_field = GROUPS[by]
    since = None if since is None else _utc(since)
    files = list(files)
    groups: dict[str | None, _Group] = {}
    total = _Group()
    created: set[str] = set()  # every created id, before `since` too
    failed: dict[str, str | None] = {}  # id -> group of its (last) failed line
    costs: Costs[str | None] = Costs()
    events = bad = 0

    for line in _lines(files):
        if line is None:
            bad += 1
            continue
        data = _parse(line)
        if data is None:
            bad += 1
            continue
        if data.get("event") != "prediction":
            continue
        moment, status, pid = data["timestamp"], data["status"], data["predictionId"]
        if status == "created" and pid is not None:
            created.add(pid)
        if since is not None and moment < since:
            continue
        events += 1
        key = data[key_field]
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group()
        latency, cost = data["latencyMs"], data["costUsd"]
        if latency is not None:
            group.latencies.append(latency)
            total.latencies.append(latency)
        if status == "created":
            group.predictions += 1
        elif status == "rejected":
            group.rejected += 1
        elif status == "failed" and pid is None:
            group.failed += 1
            group.predictions += 1
        elif status == "failed":
            failed[pid] = key
        costs.observe(key, status, pid, cost)

    for pid, key in failed.items():
        groups[key].failed += 1
        if pid not in created:  # a failed create that returned an id
            groups[key].predictions += 1
    for key, spent in costs.totals().items():
        groups[key].cost += spent

    rows = [group.row(key) for key, group in groups.items()]
    rows.sort(key=lambda r: (-r.predictions, -r.cost_usd, r.key is None, r.key or ""))
    overall = total.row("TOTAL")
    for row in rows:
        overall.predictions += row.predictions
        overall.failed += row.failed
        overall.rejected += row.rejected
        overall.cost_usd += row.cost_usd
    return Summary(by, since, rows, overall, events, bad, files)


def prediction_events(files: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Each usable prediction line of `files` in order, `timestamp` as a datetime; bad ones skipped."""
    for line in _lines(list(files)):
        data = None if line is None else _parse(line)
        if data is not None and data["event"] == "prediction":
            yield data


def _lines(files: list[Path]) -> Iterator[str | None]:
    """Each line as text, or None for one that can't be read (counted as bad)."""
    for path in files:
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rb") as stream:
                for raw in stream:
                    try:
                        yield raw.decode("utf-8")
                    except UnicodeDecodeError:
                        yield None
        except FileNotFoundError:  # rotated away since it was listed
            continue
        except (gzip.BadGzipFile, EOFError, zlib.error):  # a damaged gzip: keep what was read
            yield None


def _parse(line: str) -> dict[str, Any] | None:
    """The line's object with `timestamp` as a datetime, or None if unusable."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or "event" not in data:
        return None
    if data["event"] != "prediction":
        return data  # another kind of event: not ours to judge
    if any(name not in data for name in _REQUIRED):
        return None
    if data["status"] not in STATUSES or not isinstance(data["environment"], str):
        return None
    for name in ("userId", "predictionId", "model"):
        if data[name] is not None and not isinstance(data[name], str):
            return None
    for name in ("latencyMs", "costUsd"):
        value = data[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            return None
    stamp = data["timestamp"]
    if not isinstance(stamp, str):
        return None
    try:
        data["timestamp"] = _utc(datetime.fromisoformat(_plus_zero(stamp)))
    except ValueError:
        return None
    return data


# -- output ---------------------------------------------------------------------------

_COLUMNS = ("PREDICTIONS", "FAILED", "REJECTED", "P50_MS", "P95_MS", "COST_USD")


def format_table(summary: Summary) -> str:
    """An aligned table (no final newline): the group left-aligned, numbers right-aligned,
    TOTAL last, then notes."""
    header = [summary.by.upper(), *_COLUMNS]
    body = [_cells(row, _shown(row.key)) for row in summary.rows]
    body.append(_cells(summary.total, "TOTAL"))
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line)
        ).rstrip()
        for line in [header, *body]
    ]
    if not summary.events:
        since = "" if summary.since is None else f" since {_iso(summary.since)}"
        lines.append(f"no prediction events{since}")
    if summary.bad_lines:
        plural = "" if summary.bad_lines == 1 else "s"
        lines.append(f"skipped {summary.bad_lines} bad line{plural} (not JSON or missing fields)")
    return "\n".join(lines)


def _cells(row: Row, label: str) -> list[str]:
    return [
        label,
        str(row.predictions),
        str(row.failed),
        str(row.rejected),
        "-" if row.p50_ms is None else f"{row.p50_ms:.1f}",
        "-" if row.p95_ms is None else f"{row.p95_ms:.1f}",
        f"{row.cost_usd:.4f}",
    ]


def _shown(key: str | None) -> str:
    if key is None:
        return "-"
    # User ids come from a request header: never let one move the cursor or recolour
    # the terminal.
    return key if key.isprintable() else repr(key)[1:-1]


def to_json(summary: Summary) -> dict[str, Any]:
    """The summary as JSON-ready data, for --json."""
    return {
        "by": summary.by,
        "since": None if summary.since is None else _iso(summary.since),
        "files": [str(p) for p in summary.files],
        "events": summary.events,
        "badLines": summary.bad_lines,
        "groups": [_row_json(row) for row in summary.rows],
        "total": _row_json(summary.total) | {"key": None},
    }


def _row_json(row: Row) -> dict[str, Any]:
    return {
        "key": row.key,
        "predictions": row.predictions,
        "failed": row.failed,
        "rejected": row.rejected,
        "p50Ms": row.p50_ms,
        "p95Ms": row.p95_ms,
        "costUsd": round(row.cost_usd, 6),
    }


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
