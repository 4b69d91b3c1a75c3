"""The dashboard's history: spend, recent predictions and traffic from the audit trail.

`build()` reads the month's audit files once, at startup, in a thread; `refresh()` then
takes in only the lines appended since, also in a thread. Both run under the caller's
lock, so the documents are never read while a thread changes them.
"""

from __future__ import annotations

import os
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from skyproxy.audit.summary import audit_files, prediction_events
from skyproxy.dashboard.spend import Spend, month_start
from skyproxy.dashboard.tail import AuditTail
from skyproxy.dashboard.traffic import LONG_POINTS, SHORT_POINTS, Bucket, Traffic
from skyproxy.ops.metrics import Metrics

RECENT = 50  # predictions listed
SHOWN = ("environment", "userId", "predictionId", "model", "status", "httpStatus", "latencyMs", "costUsd")


class Board:
    def __init__(self, audit_path: Path, metrics: Metrics, now: float | None = None) -> None:
        self.started = time.time() if now is None else now
        self.traffic = Traffic(metrics)
        self.spend = Spend(self.started)
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.built = False
        self.lines = 0  # audit lines taken in
        self.bad_lines = 0
        self._tail = AuditTail(audit_path)
        self._seconds: dict[int, Bucket] = {}  # traffic before the start, from the audit trail
        self._minutes: dict[int, Bucket] = {}

    @property
    def audit_path(self) -> Path:
        return self._tail.path

    # -- blocking: call these in a thread -------------------------------------------------
    def build(self) -> None:
        """Reads the rotated files of this month and the last 24 hours, then the current file."""
        since = min(month_start(self.started), self.started - LONG_POINTS * 60)
        current = os.path.abspath(self._tail.path)
        older = [p for p in audit_files(self._tail.path) if os.path.abspath(p) != current]
        for line in prediction_events(_since(older, since)):
            self._take(line, line["timestamp"].timestamp())
        while self.refresh():
            pass
        self.built = True

    def refresh(self) -> int:
        """Takes in the lines appended since the last call; returns how many."""
        lines = self._tail.read()
        for raw in lines:
            line = _parse(raw)
            if line is None:
                self.bad_lines += 1
                continue
            self._take(line, line["moment"])
        return len(lines)

    def retarget(self, path: Path) -> None:
        """A reload named another audit file: follow it from its current end."""
        if path != self._tail.path:
            self._tail.close()
            self._tail = AuditTail(path)
            self._tail.read(start_at_end=True)

    def close(self) -> None:
        self._tail.close()

    # -- on the event loop ---------------------------------------------------------------
    def take_seed(self) -> None:
        """Hands the pre-start traffic found by build() to the live series."""
        self.traffic.seed(self._seconds, self._minutes)
        self._seconds, self._minutes = {}, {}

    def predictions(self) -> list[dict[str, Any]]:
        return list(reversed(self.recent))

    # -- taking one line in --------------------------------------------------------------
    def _take(self, line: dict[str, Any], moment: float) -> None:
        self.lines += 1
        cell = (line["environment"], line["userId"], line["model"], _client(line))
        self.spend.observe(moment, cell, line["status"], line["predictionId"], line["costUsd"])
        shown = {name: line.get(name) for name in SHOWN}
        shown["client"] = cell[3]
        shown["timestamp"] = _iso(moment)
        self.recent.append(shown)
        if moment < self.started:
            self._seed(line, moment)

    def _seed(self, line: dict[str, Any], moment: float) -> None:
        status = line.get("httpStatus")
        if not isinstance(status, int) or moment < self.started - LONG_POINTS * 60:
            return
        latency = line["latencyMs"]
        seconds = None if latency is None else latency / 1000.0
        second = int(moment)
        minute = second - second % 60
        self._minutes.setdefault(minute, Bucket()).request(status, seconds)
        if moment >= self.started - SHORT_POINTS:
            self._seconds.setdefault(second, Bucket()).request(status, seconds)


def _since(files: list[Path], since: float) -> list[Path]:
    found = []
    for path in files:
        try:
            if os.stat(path).st_mtime >= since:
                found.append(path)
        except OSError:  # rotated away since it was listed
            continue
    return found


def _parse(raw: bytes) -> dict[str, Any] | None:
    """A prediction line with its moment, or None when it is not one we can use."""
    try:
        line = orjson.loads(raw)
        if not isinstance(line, dict) or line.get("event") != "prediction":
            return None
        stamp = line["timestamp"]
        line["moment"] = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        for name in ("environment", "status"):
            if not isinstance(line[name], str):
                return None
        for name in ("userId", "predictionId", "model"):
            if line[name] is not None and not isinstance(line[name], str):
                return None
        for name in ("latencyMs", "costUsd"):
            value = line[name]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                return None
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
        return None
    return line


def _client(line: dict[str, Any]) -> str | None:
    client = line.get("client")
    return client if isinstance(client, str) else None


def _iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment % 1 * 1000):03d}Z"
