"""Key metadata: each environment's key fingerprint and when it was set. Never the key.

This is what lets `check`, `key list`, `/-/status` and the startup log warn about a key
older than `[keys] max_age_days`. A key first seen from an env:, file: or credential:
source counts from the moment skyproxy first saw that fingerprint.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from skyproxy.config import Settings
from skyproxy.keys.secret import Secret

log = logging.getLogger("skyproxy")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    fingerprint: str
    set_at: datetime

    def age_days(self, now: datetime | None = None) -> int:
        now = now or datetime.now(timezone.utc)
        return max((now - self.set_at).days, 0)


def default_state_file(environ: Mapping[str, str] = os.environ) -> Path:
    base = environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "skyproxy" / "keys.json"


def read(path: Path) -> dict[str, KeyRecord]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data.get("keys", {})
        return {
            name: KeyRecord(entry["fingerprint"], datetime.fromisoformat(entry["set_at"]))
            for name, entry in entries.items()
        }
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("key state file %s unreadable (%s); ages start afresh", path, type(exc).__name__)
        return {}


def write(path: Path, records: Mapping[str, KeyRecord]) -> None:
    data = {
        "keys": {
            name: {"fingerprint": r.fingerprint, "set_at": r.set_at.isoformat()}
            for name, r in sorted(records.items())
        }
    }
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record(path: Path, name: str, fingerprint: str, now: datetime | None = None) -> None:
    records = read(path)
    records[name] = KeyRecord(fingerprint, now or datetime.now(timezone.utc))
    write(path, records)


def forget(path: Path, name: str) -> None:
    records = read(path)
    if records.pop(name, None) is not None:
        write(path, records)


def observe(settings: Settings, keys: Mapping[str, Secret]) -> dict[str, int | None]:
    """Ages in days of the keys in use, recording fingerprints seen for the first time."""
    path = settings.key_state_file
    records = read(path)
    changed = False
    ages: dict[str, int | None] = {}
    for name, key in keys.items():
        known = records.get(name)
        if known is None or known.fingerprint != key.fingerprint:
            records[name] = known = KeyRecord(key.fingerprint, datetime.now(timezone.utc))
            changed = True
        ages[name] = known.age_days()
    if changed:
        try:
            write(path, records)
        except OSError as exc:
            log.warning("cannot write key state file %s: %s", path, exc.strerror or exc)
    return ages
