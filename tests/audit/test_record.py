"""The audit line: exact JSON, field order, the fields that exist, timestamps."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from helpers.audit import T0, record

from skyproxy.audit import costs, events, summary
from skyproxy.audit.record import FIELDS as RECORD_FIELDS
from skyproxy.audit.record import STATUSES, TERMINAL, AuditRecord, iso_millis

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
    "client",
]

# -- the line -------------------------------------------------------------------------


def test_line_is_compact_json_with_fields_in_order() -> None:
    line = record().to_line()
    assert line == (
        '{"timestamp":"2026-11-26T10:00:00.123Z","event":"prediction",'
        '"environment":"production","userId":"alice","predictionId":"pred_000000",'
        '"model":"truefusion-pro","status":"created","httpStatus":201,"latencyMs":412.5,'
        '"costUsd":0.03,"ipAddress":"127.0.0.1","requestId":"req-000000",'
        '"keyFingerprint":"sk-…ab12","method":"POST","path":"/v1/predictions","client":null}\n'
    )
    assert list(json.loads(line)) == FIELDS


@pytest.mark.parametrize(
    "changes",
    [
        {"userId": 'quote " backslash \\ newline \n tab \t bell \x07'},
        {"userId": "zoë 🦊 日本", "model": "ünïcode"},
        {"userId": None, "predictionId": None, "model": None, "latencyMs": None},
        {"costUsd": None, "ipAddress": None, "requestId": None, "keyFingerprint": None},
        {"client": "billing-backend", "userId": "end-user-7"},
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


# -- the names the readers share ----------------------------------------------------------


def test_the_field_names_are_the_records_in_line_order() -> None:
    assert list(RECORD_FIELDS) == FIELDS


def test_to_bytes_is_to_line_in_utf8() -> None:
    for rec in (record(), record(userId="zoë 🦊", costUsd=None), record(latencyMs=float("nan"))):
        assert rec.to_bytes() == rec.to_line().encode("utf-8")


def test_statuses_are_defined_once_and_shared() -> None:
    assert {"created", "failed", "rejected", "succeeded", "canceled"} == STATUSES
    assert {"succeeded", "failed", "canceled"} == TERMINAL and TERMINAL <= STATUSES
    assert summary.STATUSES is STATUSES and costs.TERMINAL is TERMINAL
    # The upstream spells one terminal status two ways; the audit knows only one.
    assert {events.status_of({"status": s}) for s in ("succeeded", "failed", "canceled")} == TERMINAL
    assert events.status_of({"status": "cancelled"}) == "canceled"
    assert events.status_of({"status": "processing"}) is None
