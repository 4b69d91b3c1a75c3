"""Each environment's key as `check`, `key show` and `key list` report it: never the key.

A key is resolved from its source and matched against the recorded ages; a key of
unknown age (first seen from an env:, file: or credential: source that skyproxy has not
recorded) is reported without one rather than as new.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from skyproxy.config import KeySpec
from skyproxy.errors import KeySourceError
from skyproxy.keys.ages import KeyRecord
from skyproxy.keys.sources import resolve


@dataclass(frozen=True, slots=True)
class KeyStatus:
    environment: str
    source: KeySpec
    fingerprint: str | None = None  # None when the key cannot be resolved
    age_days: int | None = None  # None when unknown
    problem: str | None = None  # why the key cannot be resolved, and the fix
    too_old: bool = False

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def generated(self) -> bool:
        """A throwaway key made at each start, for the embedded mock."""
        return self.source.kind == "generated"


def _status(
    environment: str,
    spec: KeySpec,
    known: KeyRecord | None,
    max_age_days: int,
    environ: Mapping[str, str] = os.environ,
) -> KeyStatus:
    """Resolves the key; its age counts only if `known` has the same fingerprint."""
    try:
        key = resolve(environment, spec, environ)
    except KeySourceError as exc:
        problem = f"{exc.reason}; {exc.fix}" if exc.fix else exc.reason
        return KeyStatus(environment, spec, problem=problem)
    age = known.age_days() if known is not None and known.fingerprint == key.fingerprint else None
    too_old = age is not None and age > max_age_days
    return KeyStatus(environment, spec, key.fingerprint, age, too_old=too_old)


def key_statuses(
    specs: Mapping[str, KeySpec],
    records: Mapping[str, KeyRecord],
    max_age_days: int,
    environ: Mapping[str, str] = os.environ,
) -> list[KeyStatus]:
    """Each environment's key status, in the given order."""
    return [_status(name, spec, records.get(name), max_age_days, environ) for name, spec in specs.items()]
