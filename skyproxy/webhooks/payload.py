"""What a Skytells webhook body says: the prediction it carries and the event's name.

Two shapes are seen: a bare prediction, or `{"type", "created_at", "data": prediction}`.
Anything else is still stored and relayed as is; it just has no prediction id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Payload:
    prediction: dict[str, Any] | None
    prediction_id: str | None
    event: str | None


def parse(body: bytes) -> Payload:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Payload(None, None, None)
    if not isinstance(value, dict):
        return Payload(None, None, None)
    data = value.get("data")
    kind = value.get("type")
    event: str | None
    if isinstance(data, dict) and isinstance(kind, str):
        prediction, event = data, kind
    else:
        status = value.get("status")
        prediction, event = value, status if isinstance(status, str) else None
    pid = prediction.get("id")
    return Payload(prediction, pid if isinstance(pid, str) else None, event)
