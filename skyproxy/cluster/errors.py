"""The one error the cluster layer raises on the request path."""

from __future__ import annotations

from skyproxy.errors import SkyproxyError


class ClusterUnavailable(SkyproxyError):
    """Redis did not answer within `timeout_ms`, or refused, and the caller may not serve.

    The proxy maps it to 503 `limits_unavailable`. The message names Redis by host and
    database only, never by its URL.
    """

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"shared state on Redis ({where}) is unavailable: {reason}")
