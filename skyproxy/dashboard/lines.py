"""Reading audit lines: the fields the dashboard counts, checked, or None for a line that
is not a usable prediction line (hostile or damaged lines included)."""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any, NamedTuple

import orjson


class Line(NamedTuple):
    moment: float  # seconds since the epoch
    # environment to client: the spend's cell, `line[1:5]` in one step
    environment: str
    user: str | None
    model: str | None
    client: str | None
    status: str
    prediction_id: str | None
    cost: float | None
    http_status: int | None
    latency_ms: float | None


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
        # Exact types, so a bool is no number and a list no name: a damaged line is skipped.
        # One set lookup checks the seven at once.
        kinds = (
            type(environment),
            type(status),
            type(user),
            type(pid),
            type(model),
            type(cost),
            type(latency),
        )
        if kinds not in _KINDS:
            return None
        when = moment(line["timestamp"])
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError, IndexError):
        return None
    client, http = line.get("client"), line.get("httpStatus")
    # tuple.__new__ straight away: the NamedTuple's own __new__ is Python code.
    return _new(
        Line,
        (
            when,
            environment,
            user,
            model,
            client if type(client) is str else None,
            status,
            pid,
            cost,
            http if type(http) is int else None,
            latency,
        ),
    )


_TEXT = (str, type(None))
_NUMBER = (int, float, type(None))
_KINDS = frozenset(itertools.product((str,), (str,), _TEXT, _TEXT, _TEXT, _NUMBER, _NUMBER))
_new = tuple.__new__


def parse(raw: bytes) -> dict[str, Any] | None:
    """The whole line as a dict, or None when it is not an object of event "prediction"."""
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return line if isinstance(line, dict) and line.get("event") == "prediction" else None


_SECONDS: dict[str, float] = {}  # "YYYY-MM-DDTHH:MM:SS" -> epoch: lines come many a second
_MILLIS = {f"{n:03d}": n / 1000 for n in range(1000)}  # ".123" as the writer writes it


def moment(stamp: str) -> float:
    """Seconds since the epoch of an audit timestamp ("2026-12-01T13:45:06.123Z")."""
    head = stamp[:19]
    second = _SECONDS.get(head)
    if second is None:
        if len(_SECONDS) > 4096:
            _SECONDS.clear()
        second = _SECONDS[head] = datetime.fromisoformat(head + "+00:00").timestamp()
    if len(stamp) == 24 and stamp[19] == "." and stamp[23] == "Z":
        millis = _MILLIS.get(stamp[20:23])
        if millis is not None:
            return second + millis
    if stamp[19:] == "Z":
        return second
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
