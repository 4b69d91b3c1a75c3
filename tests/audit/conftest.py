"""Fixtures for the audit tests: writers that are always closed, and fast retries."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from skyproxy.audit import writer as audit
from skyproxy.audit.writer import AuditWriter
from skyproxy.config import AuditSettings


@pytest.fixture
def open_writer(tmp_path: Path) -> Iterator[Callable[..., AuditWriter]]:
    """Builds writers (started unless told not to) and closes them all afterwards."""
    made: list[AuditWriter] = []

    def make(start: bool = True, **changes: Any) -> AuditWriter:
        changes.setdefault("path", tmp_path / "audit.jsonl")
        writer = AuditWriter(AuditSettings(**changes))
        made.append(writer)
        if start:
            writer.start()
        return writer

    yield make
    for writer in made:
        writer.close(timeout=2.0)


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "BACKOFF_MIN", 0.01)
    monkeypatch.setattr(audit, "BACKOFF_MAX", 0.05)
