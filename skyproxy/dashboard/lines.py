"""Reading audit lines: the fields the dashboard counts, checked, or None for a line that
is not a usable prediction line (hostile or damaged lines included)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

import orjson


class Line(NamedTuple):
    moment: float  # seconds since the epoch
    environment: str
    user: str | None
    prediction_id: str | None
    model: str | None
    status: str
    http_status: int | None
    latency_ms: float | None
    cost: float | None
    client: str | None


def read(raw: bytes) -> Line | None:
    try:
        line = orjson.loads(raw)
        if line["event"] != "prediction":
            return None
        environment, status, cost, latency = (
            line["environment"],
            line["status"],
            line["costUsd"],
            line["latencyMs"],
        )
        user, pid, model = line["userId"], line["predictionId"], line["model"]
        client, http = line.get("client"), line.get("httpStatus")
        # Exact types, so a bool is no number and a list no name: a damaged line is skipped.
        if not (
            type(environment) is str
            and type(status) is str
            and type(user) in _TEXT
            and type(pid) in _TEXT
            and type(model) in _TEXT
            and type(cost) in _NUMBER
            and type(latency) in _NUMBER
        ):
            return None
        when = moment(line["timestamp"])
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError, IndexError):
        return None
    return Line(
        when,
        environment,
        user,
        pid,
        model,
        status,
        http if type(http) is int else None,
        latency,
        cost,
        client if type(client) is str else None,
    )


_TEXT = frozenset({str, type(None)})
_NUMBER = frozenset({int, float, type(None)})


def parse(raw: bytes) -> dict[str, Any] | None:
    """The whole line as a dict, or None when it is not an object of event "prediction"."""
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return line if isinstance(line, dict) and line.get("event") == "prediction" else None


_SECONDS: dict[str, float] = {}  # "YYYY-MM-DDTHH:MM:SS" -> epoch: lines come many a second


def moment(stamp: str) -> float:
    """Seconds since the epoch of an audit timestamp ("2026-12-01T13:45:06.123Z")."""
    head = stamp[:19]
    second = _SECONDS.get(head)
    if second is None:
        if len(_SECONDS) > 4096:
            _SECONDS.clear()
        second = _SECONDS[head] = datetime.fromisoformat(head + "+00:00").timestamp()
    if len(stamp) == 24 and stamp[19] == "." and stamp[23] == "Z":  # as the writer writes it
        return second + int(stamp[20:23]) / 1000
    if stamp[19:] == "Z":
        return second
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
