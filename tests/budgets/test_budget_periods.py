"""Calendar periods in UTC and the spend rule shared with `audit summary`."""

from __future__ import annotations

import random
from datetime import datetime, timezone
from pathlib import Path

import pytest

from skyproxy.audit.costs import Costs
from skyproxy.audit.record import AuditRecord
from skyproxy.audit.summary import summarize
from skyproxy.budgets.periods import iso, window


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize(
    ("period", "moment", "start", "end"),
    [
        ("day", "2026-11-26T23:59:59.999", "2026-11-26T00:00:00", "2026-11-27T00:00:00"),
        ("day", "2026-11-27T00:00:00", "2026-11-27T00:00:00", "2026-11-28T00:00:00"),
        ("week", "2026-11-26T10:00:00", "2026-11-23T00:00:00", "2026-11-30T00:00:00"),  # a Thursday
        ("week", "2026-11-30T00:00:00", "2026-11-30T00:00:00", "2026-12-07T00:00:00"),  # a Monday
        ("week", "2026-12-31T12:00:00", "2026-12-28T00:00:00", "2027-01-04T00:00:00"),
        ("month", "2026-12-31T23:59:59", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
        ("month", "2028-02-29T12:00:00", "2028-02-01T00:00:00", "2028-03-01T00:00:00"),
        ("month", "2026-01-31T00:00:00", "2026-01-01T00:00:00", "2026-02-01T00:00:00"),
    ],
)
def test_windows_are_calendar_periods_in_utc(period: str, moment: str, start: str, end: str) -> None:
    assert window(period, at(moment)) == (at(start), at(end))  # type: ignore[arg-type]
    assert iso(at(end)) == end + "Z"


STATUSES = ("created", "created", "succeeded", "failed", "canceled", "rejected")


def random_lines(seed: int) -> list[AuditRecord]:
    rng = random.Random(seed)
    lines = []
    for i in range(300):
        pid = rng.choice([None, *(f"p{n}" for n in range(40))])
        cost = rng.choice([None, 0.0, 0.01, 0.05, 0.3, 1.25])
        lines.append(
            AuditRecord(
                timestamp=at("2026-11-26T10:00:00") + i,
                environment="dev",
                userId=rng.choice(["alice", "bob", None]),
                predictionId=pid,
                model="m",
                status=rng.choice(STATUSES),
                httpStatus=200,
                latencyMs=1.0,
                costUsd=cost,
                ipAddress=None,
                requestId=str(i),
                keyFingerprint=None,
                method="POST",
                path="/v1/predictions",
            )
        )
    return lines


@pytest.mark.parametrize("seed", range(5))
def test_the_fold_gives_what_audit_summary_shows(tmp_path: Path, seed: int) -> None:
    lines = random_lines(seed)
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(r.to_line() for r in lines))
    shown = {row.key: row.cost_usd for row in summarize([path], None, "user").rows}
    costs: Costs[str | None] = Costs()
    running: dict[str | None, float] = {}
    for r in lines:
        for key, change in costs.observe(r.userId, r.status, r.predictionId, r.costUsd):
            running[key] = running.get(key, 0.0) + change
    totals = costs.totals()
    assert set(totals) <= set(shown)
    for key, total in shown.items():
        assert totals.get(key, 0.0) == total  # exactly: the summary adds through the same fold
        assert running.get(key, 0.0) == pytest.approx(total, abs=1e-9)  # the live form, change by change
