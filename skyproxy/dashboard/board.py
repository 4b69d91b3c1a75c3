"""The dashboard's history: spend, recent predictions and traffic from the audit trail.

`build()` reads this month's audit files (and the last 24 hours') once, at startup, in
a thread; `refresh()` then takes in only the lines appended since, also in a thread.
Both run under the caller's lock, so the documents are never read while a thread
changes them. A line costs one JSON parse and one spend step; only the last few
are kept whole, for the list of recent predictions.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from skyproxy.audit.summary import audit_files
from skyproxy.dashboard import lines as audit_lines
from skyproxy.dashboard.spend import Spend, month_start
from skyproxy.dashboard.tail import AuditTail, file_lines
from skyproxy.dashboard.traffic import LONG_POINTS, SHORT_POINTS, Bucket, Traffic
from skyproxy.ops.metrics import Metrics

RECENT = 50  # predictions listed
SHOWN = ("environment", "userId", "predictionId", "model", "status", "httpStatus", "latencyMs", "costUsd")
_NO_COST = b'"costUsd":null'


class Board:
    def __init__(self, audit_path: Path, metrics: Metrics, now: float | None = None) -> None:
        self.started = time.time() if now is None else now
        self.traffic = Traffic(metrics)
        self.spend = Spend(self.started)
        self.recent: deque[tuple[float, bytes]] = deque(maxlen=RECENT)
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
        for path in audit_files(self._tail.path):
            if os.path.abspath(path) != current and _modified_since(path, since):
                lines = file_lines(path)
                while chunk := list(itertools.islice(lines, 4096)):
                    self.take_lines(chunk)
        while self.refresh():
            pass
        self.built = True

    def refresh(self) -> int:
        """Takes in the lines appended since the last call; returns how many."""
        found = self._tail.read()
        self.take_lines(found)
        return len(found)

    def take_lines(self, found: list[bytes]) -> None:
        """New audit lines, oldest first."""
        last = len(found) - RECENT  # only the last lines can still be listed
        seed = not self.built
        read, observe, recent = audit_lines.read, self.spend.observe, self.recent
        bad = 0
        # One loop, no call per line but the reading and the spend step: it runs for every line.
        for i, raw in enumerate(found):
            keep = i >= last
            # find, not `in`: `in` first tries the pattern as an int and builds a TypeError.
            if not keep and not seed and raw.find(_NO_COST) >= 0:
                continue  # no spend to count, and listed no more: nothing to read
            line = read(raw)
            if line is None:
                bad += 1
                continue
            observe(line[0], line[1:5], line[5], line[6], line[7])  # line[1:5]: the cell
            if keep:
                recent.append((line[0], raw))
            if seed and line[0] < self.started:
                self._seed(line)
        self.lines += len(found) - bad
        self.bad_lines += bad

    def retarget(self, path: Path) -> None:
        """A reload named another audit file: the old one is read to its end, then the new
        one from its start (lines written to it since the reload are new; any it held
        before are history, as at startup)."""
        if path != self._tail.path:
            while self.refresh():
                pass
            self._tail.close()
            self._tail = AuditTail(path)

    def close(self) -> None:
        self._tail.close()

    # -- on the event loop ---------------------------------------------------------------
    def take_seed(self) -> None:
        """Hands the pre-start traffic found by build() to the live series."""
        self.traffic.seed(self._seconds, self._minutes)
        self._seconds, self._minutes = {}, {}

    def predictions(self) -> list[dict[str, Any]]:
        """The latest lines first, with only the fields the page shows."""
        shown = []
        for moment, raw in reversed(self.recent):
            line = audit_lines.parse(raw) or {}
            row = {name: line.get(name) for name in SHOWN}
            client = line.get("client")
            row["client"] = client if isinstance(client, str) else None
            row["timestamp"] = _iso(moment)
            shown.append(row)
        return shown

    # -- taking one line in --------------------------------------------------------------
    def _seed(self, line: audit_lines.Line) -> None:
        status, moment = line.http_status, line.moment
        if status is None or moment < self.started - LONG_POINTS * 60:
            return
        seconds = None if line.latency_ms is None else line.latency_ms / 1000.0
        second = int(moment)
        minute = second - second % 60
        self._minutes.setdefault(minute, Bucket()).request(status, seconds)
        if moment >= self.started - SHORT_POINTS:
            self._seconds.setdefault(second, Bucket()).request(status, seconds)


def _modified_since(path: Path, since: float) -> bool:
    try:
        return os.stat(path).st_mtime >= since
    except OSError:  # rotated away since it was listed
        return False


def _iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment % 1 * 1000):03d}Z"
