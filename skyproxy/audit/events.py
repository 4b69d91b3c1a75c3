"""Which exchanges are prediction events, and what the audit learns from their bodies.

Only small JSON bodies are parsed, and only for the fields the audit needs. A terminal
state is recorded once per prediction, however often a client polls.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

import orjson

from skyproxy import codings
from skyproxy.audit.record import TERMINAL

Kind = Literal["create", "poll", "cancel"]

CREATE_PATHS = frozenset(
    {"/v1/predictions", "/v1/predict", "/v1/chat/completions", "/v1/responses", "/v1/embeddings"}
)
# The upstream's spellings of a terminal status, each mapped to the audit's.
_TERMINAL_SPELLINGS = {status: status for status in TERMINAL} | {"cancelled": "canceled"}
_TERMINAL_MARKERS = (b"succeeded", b"failed", b"cancel")


def kind_of(method: str, path: str) -> Kind | None:
    if method == "POST" and path in CREATE_PATHS:
        return "create"
    if not path.startswith("/v1/predictions/"):
        return None
    rest = path[len("/v1/predictions/") :]
    if method == "GET" and rest and "/" not in rest:
        return "poll"
    if method == "POST" and rest.endswith("/cancel") and rest.count("/") == 1:
        return "cancel"
    return None


def prediction_id_of(path: str) -> str:
    return path[len("/v1/predictions/") :].split("/", 1)[0]


def parse_json(body: bytes | bytearray | None, encoding: str | None) -> dict[str, Any] | None:
    """A small JSON object body, or None for anything else (streams, lists, truncated)."""
    if not body:
        return None
    # Decoded, no larger than the most the proxy keeps of a plain body: a coded body is
    # parsed only where the same body sent plain would have been.
    raw = codings.decode(body, encoding, 65_536)
    if raw is None:
        return None
    if raw.startswith(b"data:"):
        return _first_sse_event(raw)
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _first_sse_event(raw: bytes | bytearray) -> dict[str, Any] | None:
    line = raw.split(b"\n", 1)[0][5:].strip()
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def may_be_terminal(body: bytes | bytearray | None, encoding: str | None) -> bool:
    """A cheap pre-check so that most polls skip the JSON parse."""
    if not body:
        return False
    if encoding not in (None, "identity"):
        return True
    return any(marker in body for marker in _TERMINAL_MARKERS)


def model_in(body: bytes) -> str | None:
    """The model a plain JSON request body names (a create's), or None."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return model_of(value) if isinstance(value, dict) else None


def model_of(obj: dict[str, Any] | None) -> str | None:
    if not obj:
        return None
    model = obj.get("model")
    if isinstance(model, dict):
        model = model.get("name") or model.get("slug")
    return model if isinstance(model, str) else None


def credits_of(obj: dict[str, Any] | None) -> float | None:
    try:
        value = obj["metadata"]["billing"]["credits_used"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def status_of(obj: dict[str, Any] | None) -> str | None:
    """The terminal status, normalised (`cancelled` is logged as `canceled`), or None."""
    if not obj:
        return None
    if obj.get("success") is True and "status" not in obj:
        return "canceled"
    status = obj.get("status")
    return _TERMINAL_SPELLINGS.get(status) if isinstance(status, str) else None


class Tracker:
    """Remembers created predictions and the terminal ones already recorded, bounded."""

    __slots__ = ("_created", "_done", "_limit")

    def __init__(self, limit: int = 100_000) -> None:
        self._limit = limit
        self._created: OrderedDict[str, tuple[str | None, str | None]] = OrderedDict()
        self._done: OrderedDict[str, None] = OrderedDict()

    def created(self, prediction_id: str, model: str | None, user: str | None) -> None:
        self._remember(self._created, prediction_id, (model, user))

    def origin(self, prediction_id: str) -> tuple[str | None, str | None]:
        """The (model, user) a prediction was created with, when this process saw it."""
        return self._created.get(prediction_id, (None, None))

    def first_terminal(self, prediction_id: str) -> bool:
        """True once per prediction: the first time its terminal state is seen."""
        if prediction_id in self._done:
            return False
        self._remember(self._done, prediction_id, None)
        return True

    def _remember(self, table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        if len(table) > self._limit:
            table.popitem(last=False)
