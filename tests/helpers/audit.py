"""Audit helpers: a record with every field set, and reading what the writer wrote."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from skyproxy.audit.record import AuditRecord

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
