"""The receiver: `POST /hooks/{environment}/{route}` and `GET /-/health`, and nothing else.

This is the one port meant to face the internet, so it proxies nothing and answers no
admin path. An event is verified before anything is stored, read under a size limit
that applies while the body arrives, and committed (fsynced) before the 2xx goes out.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from skyproxy.cluster.errors import ClusterUnavailable
from skyproxy.keys.secret import Secret
from skyproxy.proxy.responses import error_response, request_id_of
from skyproxy.webhooks import payload
from skyproxy.webhooks.queue import Receipts, StoreReceipts
from skyproxy.webhooks.signing import SKYTELLS_HEADER, verify_skytells
from skyproxy.webhooks.stats import WebhookStats
from skyproxy.webhooks.store import Route, StoreThread

log = logging.getLogger("skyproxy")
_HOOK = re.compile(r"/hooks/([A-Za-z0-9_-]{1,64})/([A-Za-z0-9_-]{16,64})")
WARN_EVERY = 10.0  # seconds between two warnings about refused signatures


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    verifiers: Mapping[str, tuple[Secret, ...]]  # per environment: the keys a signature may use
    max_body_bytes: int


@dataclass(frozen=True, slots=True)
class Arrival:
    """A verified event just stored for the first time."""

    environment: str
    route: Route
    event_id: str
    body: payload.Payload


class Receiver:
    def __init__(
        self,
        db: StoreThread,
        config: ReceiverConfig,
        stats: WebhookStats,
        on_stored: Callable[[Arrival], None] | None = None,
        receipts: Receipts | None = None,  # with [cluster]: the shared outbox
    ) -> None:
        self._receipts = receipts or StoreReceipts(db)
        self.config = config  # swapped whole on reload
        self.stats = stats
        self._on_stored = on_stored
        self._warned = 0.0
        self._refused_since_warning = 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        request_id = request_id_of(request.headers)
        path = request.path
        if path == "/-/health" and request.method in ("GET", "HEAD"):
            return web.json_response({"status": "ok"}, headers={"X-Request-Id": request_id})
        found = _HOOK.fullmatch(path)
        if found is None or path != request.raw_path:
            message = "This port serves only POST /hooks/{environment}/{route} and GET /-/health."
            return error_response(404, "not_found", message, request_id)
        if request.method != "POST":
            refused = error_response(405, "method_not_allowed", "Webhooks are POSTed.", request_id)
            refused.headers["Allow"] = "POST"
            return refused
        environment, route_id = found.groups()
        config = self.config
        keys = config.verifiers.get(environment)
        if keys is None:
            return _unknown_route(request_id)
        body = await _read(request, config.max_body_bytes)
        if body is None:
            message = f"The webhook body exceeds {config.max_body_bytes} bytes."
            too_large = error_response(413, "body_too_large", message, request_id)
            too_large.force_close()
            return too_large
        secrets = (key.reveal().encode() for key in keys)
        if not verify_skytells(body, request.headers.get(SKYTELLS_HEADER), secrets):
            return self._refuse(request, request_id)
        return await self._store(request, environment, route_id, body, request_id)

    async def _store(
        self, request: web.BaseRequest, environment: str, route_id: str, body: bytes, request_id: str
    ) -> web.StreamResponse:
        parsed = payload.parse(body)
        content_type = request.headers.get("Content-Type", "application/json")
        try:
            receipt = await self._receipts.receive(
                environment, route_id, body, content_type, parsed.prediction_id, parsed.event, time.time()
            )
        except ClusterUnavailable:
            # Not stored, so not acknowledged: Skytells sends it again later.
            message = "Webhooks cannot be stored right now. Please retry."
            unavailable = error_response(503, "webhooks_unavailable", message, request_id)
            unavailable.headers["Retry-After"] = "1"
            return unavailable
        if receipt.outcome == "unknown_route":
            return _unknown_route(request_id)
        headers = {"X-Request-Id": request_id}
        if receipt.outcome == "duplicate":
            self.stats.duplicates += 1
            return web.json_response({"received": True, "duplicate": True}, headers=headers)
        self.stats.received += 1
        assert receipt.route is not None and receipt.event_id is not None
        if self._on_stored is not None:
            try:
                self._on_stored(Arrival(environment, receipt.route, receipt.event_id, parsed))
            except Exception:
                # Stored is stored: a failing observer must not turn the answer into a retry.
                log.exception("webhook %s: an observer failed", receipt.event_id)
        return web.json_response({"received": True}, headers=headers)

    def _refuse(self, request: web.BaseRequest, request_id: str) -> web.Response:
        self.stats.refused_signature += 1
        self._refused_since_warning += 1
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY:
            # The port faces the internet: one line per burst, never one per request.
            log.warning(
                "webhook receiver: %d request(s) refused for a missing or wrong signature (last from %s)",
                self._refused_since_warning,
                request.remote,
            )
            self._warned = now
            self._refused_since_warning = 0
        message = f"Missing or invalid {SKYTELLS_HEADER}."
        return error_response(401, "invalid_signature", message, request_id)


def _unknown_route(request_id: str) -> web.Response:
    return error_response(404, "unknown_route", "No such webhook route.", request_id)


async def _read(request: web.BaseRequest, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is known to exceed `limit`."""
    length = request.content_length
    if length is not None and length > limit:
        return None
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)
