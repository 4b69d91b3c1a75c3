"""The hot path: guard -> limit -> forward -> stream back -> audit.

One handler per environment, bound to its name: a request that arrived on one
environment's listener can only ever be sent with that environment's key.
"""

from __future__ import annotations

import logging
import re

from aiohttp import web
from multidict import CIMultiDict

from skyproxy.audit import events
from skyproxy.audit.record import AuditRecord
from skyproxy.http1.client import Client
from skyproxy.ops.metrics import route_of
from skyproxy.proxy.exchange import Outcome
from skyproxy.proxy.forward import forward
from skyproxy.proxy.guard import Refusal
from skyproxy.proxy.headers import outbound_head
from skyproxy.proxy.responses import error_response, request_id_of
from skyproxy.proxy.runtime import EnvRuntime, Runtime, State, cors_headers

log = logging.getLogger("skyproxy")

_DOT_SEGMENT = re.compile(r"/\.\.?(?:/|$)")
_PREFLIGHT_METHODS = "GET, POST, DELETE, OPTIONS"


def _forwardable(request: web.BaseRequest) -> bool:
    """A /v1/ path in origin form, with no dot segment (even percent-encoded) to climb out.

    The upstream URL is the base URL plus the raw target, so an absolute-form target
    (`GET http://host/v1/x`) or `/v1/../x` must never get that far.
    """
    path = request.path
    return (
        path.startswith("/v1/") and request.raw_path.startswith("/v1/") and _DOT_SEGMENT.search(path) is None
    )


class ProxyHandler:
    __slots__ = ("client", "environment", "state")

    def __init__(self, environment: str, state: State, client: Client) -> None:
        self.environment = environment
        self.state = state
        self.client = client

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        runtime = self.state.runtime  # this request's generation, start to finish
        env = runtime.environments.get(self.environment)
        request_id = request_id_of(request.headers)
        if env is None:
            return error_response(503, "environment_unavailable", "This environment was removed.", request_id)
        refusal = env.guard.check(request.headers, request.remote)
        if refusal is not None:
            return self._refuse(refusal, request, request_id)
        path = request.path
        if not _forwardable(request):
            return self._count(
                error_response(404, "not_found", "Only /v1/ paths are forwarded.", request_id),
                path,
            )
        origin = env.guard.allowed_origin(request.headers)
        if request.method == "OPTIONS":
            return self._preflight(request, origin, request_id)
        reply = CIMultiDict({"X-Request-Id": request_id})
        if origin is not None:
            reply.extend(cors_headers(origin))
        kind = events.kind_of(request.method, path) if runtime.settings.audit.enabled else None
        refused, user = await self._admit(request, runtime, env, path, kind, reply, request_id)
        if refused is not None:
            return self._count(refused, path)
        # Admission is over before the exchange starts, so the exchange runs a coroutine
        # frame shallower: every resume of the I/O below walks that chain.
        response = await self._forward(request, runtime, env, kind, user, reply, request_id)
        return self._count(response, path)

    async def _admit(
        self,
        request: web.BaseRequest,
        runtime: Runtime,
        env: EnvRuntime,
        path: str,
        kind: events.Kind | None,
        reply: CIMultiDict[str],
        request_id: str,
    ) -> tuple[web.Response | None, str | None]:
        """Rate limits and the audit's health: a refusal, or None and the user to bill."""
        method = request.method
        user = request.headers.get(env.user_header)
        if runtime.limits.is_limited(env.name, method, path):
            rate_limit = runtime.settings.rate_limit
            if not user:
                if rate_limit.missing_user == "reject":
                    message = f"The {rate_limit.user_header} header is required."
                    return error_response(400, "missing_user", message, request_id, headers=reply), None
                user = "anonymous"
            verdict = await runtime.limits.check(env.name, method, path, user)
            if verdict is not None:
                reply.extend(verdict.headers)
                if not verdict.allowed:
                    self.state.metrics.rejected(verdict.rule, verdict.scope or "user")
                    if kind == "create":
                        self._audit(request, env, user, request_id, 429, None, None, "rejected")
                    refusal = error_response(
                        429,
                        verdict.code or "rate_limited",
                        verdict.message or "Rate limited.",
                        request_id,
                        headers=reply,
                        extra={"retry_after": verdict.retry_after},
                    )
                    return refusal, user
        if kind == "create" and self.state.audit.reject_new:
            message = "The audit trail cannot be written; predictions are paused."
            return error_response(503, "audit_unavailable", message, request_id, headers=reply), user
        return None, user

    async def _forward(
        self,
        request: web.BaseRequest,
        runtime: Runtime,
        env: EnvRuntime,
        kind: events.Kind | None,
        user: str | None,
        reply: CIMultiDict[str],
        request_id: str,
    ) -> web.StreamResponse:
        server = runtime.settings.server
        expect = request.headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            message = "Only the expectation 100-continue is understood."
            return error_response(417, "expectation_failed", message, request_id, headers=reply)
        length = request.content_length
        if length is not None and length > server.max_body_bytes:
            too_large = error_response(
                413,
                "body_too_large",
                f"Request body exceeds {server.max_body_bytes} bytes.",
                request_id,
                headers=reply,
            )
            too_large.force_close()
            return too_large
        exchange = Outcome(
            request_prefix=bytearray() if kind == "create" else None,
            response_prefix=bytearray() if kind is not None else None,
        )
        key = env.key.reveal()
        head = outbound_head(request.raw_headers, key.encode(), request_id, env.user_header_raw)
        response: web.StreamResponse | None = await forward(
            request,
            self.client,
            env.origin,
            head,
            reply,
            server,
            key,
            env.key.fingerprint,
            exchange,
            self.state.deadlines,
        )
        self._observe(env, exchange)
        if exchange.failure is not None and response is None:
            failure = exchange.failure
            response = error_response(
                failure.status, failure.code, failure.message, request_id, headers=reply
            )
            if failure.status == 413:
                response.force_close()
            exchange.status = failure.status
        if kind is not None:
            self._audit_exchange(request, runtime, env, kind, user, request_id, exchange)
        assert response is not None
        return response

    def _observe(self, env: EnvRuntime, exchange: Outcome) -> None:
        metrics = self.state.metrics
        if exchange.latency_ms is not None and exchange.failure is None:
            metrics.latency(env.name, exchange.latency_ms / 1000.0)
        if exchange.status == 401:
            metrics.upstream_unauthorized(env.name)
            log.error(
                "environment %s: key rejected by upstream; revoked or rotated? (401, key %s)",
                env.name,
                env.key.fingerprint,
            )
        elif exchange.status == 429:
            metrics.upstream_rate_limited(env.name)

    def _audit_exchange(
        self,
        request: web.BaseRequest,
        runtime: Runtime,
        env: EnvRuntime,
        kind: events.Kind,
        user: str | None,
        request_id: str,
        exchange: Outcome,
    ) -> None:
        status = exchange.status
        body = exchange.response_prefix
        if kind == "create":
            sent = events.parse_json(exchange.request_prefix, None)
            model = events.model_of(sent)
            ok = 200 <= status < 300 and not exchange.broken
            answer = events.parse_json(body, exchange.content_encoding) if ok else None
            prediction_id = answer.get("id") if answer else None
            model = model or events.model_of(answer)
            if ok and isinstance(prediction_id, str):
                self.state.tracker.created(prediction_id, model, user)
            else:
                prediction_id = None
            cost = runtime.settings.pricing.get(model) if ok and model else None
            outcome = "created" if ok else "failed"
            self._audit(
                request,
                env,
                user,
                request_id,
                status,
                model,
                prediction_id,
                outcome,
                exchange.latency_ms,
                cost,
            )
            return
        if not 200 <= status < 300 or not events.may_be_terminal(body, exchange.content_encoding):
            return
        answer = events.parse_json(body, exchange.content_encoding)
        terminal = events.status_of(answer)
        prediction_id = events.prediction_id_of(request.path)
        if terminal is None or not self.state.tracker.first_terminal(prediction_id):
            return
        created_model, created_user = self.state.tracker.origin(prediction_id)
        model = events.model_of(answer) or created_model
        cost = events.credits_of(answer)
        if cost is None and model is not None:
            cost = runtime.settings.pricing.get(model)
        self._audit(
            request,
            env,
            user or created_user,
            request_id,
            status,
            model,
            prediction_id,
            terminal,
            exchange.latency_ms,
            cost,
        )

    def _audit(
        self,
        request: web.BaseRequest,
        env: EnvRuntime,
        user: str | None,
        request_id: str,
        http_status: int,
        model: str | None,
        prediction_id: str | None,
        status: str,
        latency_ms: float | None = None,
        cost: float | None = None,
    ) -> None:
        record = AuditRecord(
            environment=env.name,
            userId=user,
            predictionId=prediction_id,
            model=model,
            status=status,
            httpStatus=http_status,
            latencyMs=None if latency_ms is None else round(latency_ms, 1),
            costUsd=cost,
            ipAddress=request.remote,
            requestId=request_id,
            keyFingerprint=env.key.fingerprint,
            method=request.method,
            path=request.path,
        )
        self.state.metrics.prediction(env.name, status)
        if not self.state.audit.submit(record):
            log.error("audit queue full: a %s line for %s was dropped", status, request_id)

    def _refuse(self, refusal: Refusal, request: web.BaseRequest, request_id: str) -> web.StreamResponse:
        log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote, refusal.code)
        return self._count(
            error_response(refusal.status, refusal.code, refusal.message, request_id), request.path
        )

    def _preflight(self, request: web.BaseRequest, origin: str | None, request_id: str) -> web.Response:
        if origin is None:
            return error_response(
                403, "origin_not_allowed", "CORS preflight from an origin not allowed.", request_id
            )
        headers = cors_headers(origin)
        headers["Access-Control-Allow-Methods"] = _PREFLIGHT_METHODS
        asked = request.headers.get("Access-Control-Request-Headers")
        if asked:
            headers["Access-Control-Allow-Headers"] = asked
        headers["Access-Control-Max-Age"] = "600"
        headers["X-Request-Id"] = request_id
        return web.Response(status=204, headers=headers)

    def _count(self, response: web.StreamResponse, path: str) -> web.StreamResponse:
        self.state.count(self.environment, route_of(path), response.status)
        return response
