"""One audit line: the `AuditRecord`, its field names and statuses, and its exact bytes.

The record has no field for keys, prompts or outputs, by design. Its JSON is compact,
with the fields in declaration order and one object per line.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from json.encoder import encode_basestring

import orjson

__all__ = ["FIELDS", "STATUSES", "TERMINAL", "AuditRecord", "iso_millis"]

# Every status a line can carry; the terminal ones end a prediction.
STATUSES = frozenset({"created", "failed", "rejected", "succeeded", "canceled"})
TERMINAL = frozenset({"succeeded", "failed", "canceled"})

_LINE = (
    '{"timestamp":"%s","event":"prediction","environment":%s,"userId":%s,'
    '"predictionId":%s,"model":%s,"status":%s,"httpStatus":%d,"latencyMs":%s,'
    '"costUsd":%s,"ipAddress":%s,"requestId":%s,"keyFingerprint":%s,"method":%s,'
    '"path":%s,"client":%s}\n'
)


@dataclass(slots=True, kw_only=True)
class AuditRecord:
    """One prediction event."""

    timestamp: float = field(default_factory=time.time)  # seconds since the epoch
    event: str = field(default="prediction", init=False)
    environment: str
    userId: str | None
    predictionId: str | None
    model: str | None
    status: str  # one of STATUSES
    httpStatus: int
    latencyMs: float | None
    costUsd: float | None
    ipAddress: str | None
    requestId: str | None
    keyFingerprint: str | None
    method: str
    path: str
    client: str | None = None  # the client token's name, when one was presented

    def to_bytes(self) -> bytes:
        """The line as UTF-8 bytes, as it goes to disk.

        orjson builds it in one call; a lone surrogate (from undecodable header bytes),
        which orjson refuses, takes the template path and comes out as a \\udcXX escape,
        a valid JSON escape, so the line stays valid UTF-8 and valid JSON.
        """
        try:
            return orjson.dumps(
                {
                    "timestamp": iso_millis(self.timestamp),
                    "event": "prediction",
                    "environment": self.environment,
                    "userId": self.userId,
                    "predictionId": self.predictionId,
                    "model": self.model,
                    "status": self.status,
                    "httpStatus": self.httpStatus,
                    "latencyMs": self.latencyMs,
                    "costUsd": self.costUsd,
                    "ipAddress": self.ipAddress,
                    "requestId": self.requestId,
                    "keyFingerprint": self.keyFingerprint,
                    "method": self.method,
                    "path": self.path,
                    "client": self.client,
                },
                option=orjson.OPT_APPEND_NEWLINE,
            )
        except orjson.JSONEncodeError:
            return self.to_line().encode("utf-8", "backslashreplace")

    def to_line(self) -> str:
        """Compact JSON, fields in declaration order, ending in a newline.

        Equal to json.dumps(..., ensure_ascii=False, separators=(",", ":")), built from a
        template with the C string encoder because it runs for every prediction.
        """
        s = encode_basestring
        return _LINE % (
            iso_millis(self.timestamp),
            s(self.environment),
            "null" if self.userId is None else s(self.userId),
            "null" if self.predictionId is None else s(self.predictionId),
            "null" if self.model is None else s(self.model),
            s(self.status),
            self.httpStatus,
            _number(self.latencyMs),
            _number(self.costUsd),
            "null" if self.ipAddress is None else s(self.ipAddress),
            "null" if self.requestId is None else s(self.requestId),
            "null" if self.keyFingerprint is None else s(self.keyFingerprint),
            s(self.method),
            s(self.path),
            "null" if self.client is None else s(self.client),
        )


# The field names in line order, for readers of the trail.
FIELDS = tuple(f.name for f in dataclasses.fields(AuditRecord))


def _number(value: float | None) -> str:
    # NaN and infinity have no JSON spelling; null keeps the line parseable.
    if value is None or not math.isfinite(value):
        return "null"
    return repr(value)


_second_cache: tuple[int, str] = (-1, "")


def iso_millis(timestamp: float) -> str:
    """ISO 8601 UTC with milliseconds, like "2026-11-26T10:00:00.123Z"."""
    global _second_cache
    # Round to microseconds first, as datetime.fromtimestamp does, so 0.123 isn't 0.122.
    micros = round(timestamp * 1_000_000)
    second, millis = divmod(micros // 1000, 1000)
    cached_second, prefix = _second_cache
    if second != cached_second:  # strftime once a second, not once a line
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second_cache = (second, prefix)  # one tuple: threads see old or new, never half
    return f"{prefix}.{millis:03d}Z"
