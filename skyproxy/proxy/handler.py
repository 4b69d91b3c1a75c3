"""The hot path: guard -> admit -> forward (and relay) -> record.

One handler per environment, bound to its name: a request that arrived on one
environment's listener can only ever be sent with that environment's key.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from aiohttp import hdrs, web
from multidict import CIMultiDict, istr

from skyproxy.audit import events
from skyproxy.budgets.enforce import NO_HOLD, Exceeded, Hold
from skyproxy.cluster.errors import ClusterUnavailable
from skyproxy.http1.client import Client
from skyproxy.ops.metrics import route_of
from skyproxy.proxy import access, body, creates, record
from skyproxy.proxy.cors import cors_headers, preflight
from skyproxy.proxy.deadlines import Phase
from skyproxy.proxy.exchange import Call, Failure, Route
from skyproxy.proxy.forward import BODY_TIMED_OUT, forward
from skyproxy.proxy.guard import Refusal
from skyproxy.proxy.inflight import NO_SLOTS, InFlight, TooMany
from skyproxy.proxy.responses import error_response, request_id_of
from skyproxy.proxy.runtime import EnvRuntime, State
from skyproxy.proxy.scrub import mask_of

log = logging.getLogger("skyproxy")
_T = TypeVar("_T")

_DOT_SEGMENT = re.compile(r"/\.\.?(?:/|$)")
_COMMON_METHODS = frozenset(("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"))
# TRACE (and IIS's TRACK) asks the upstream to echo the request, key included; CONNECT
# asks for a tunnel, which would carry bytes no relay looks at. Neither is ever sent on.
_NEVER_FORWARDED = frozenset(("TRACE", "TRACK", "CONNECT"))
_REQUEST_ID = istr("X-Request-Id")  # an istr goes into a CIMultiDict without being folded again


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
    __slots__ = ("_route", "_routed", "client", "environment", "state")

    def __init__(self, environment: str, state: State, client: Client) -> None:
        self.environment = environment
        self.state = state
        self.client = client
        self._route: Route | None = None
        self._routed: EnvRuntime | None = None  # the generation's environment _route was built for

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        runtime = self.state.runtime  # this request's generation, start to finish
        env = runtime.environments.get(self.environment)
        request_id = request_id_of(request.headers)
        if env is None:
            return error_response(503, "environment_unavailable", "This environment was removed.", request_id)
        # guard
        refusal = env.guard.check(request.headers, request.remote)
        if refusal is not None:
            return self._refuse(refusal, request, request_id)
        path = request.path
        method = request.method
        if method not in _COMMON_METHODS and method.upper() in _NEVER_FORWARDED:
            message = f"{method.upper()} is never forwarded."
            return self._count(error_response(501, "method_not_supported", message, request_id), path)
        if not _forwardable(request):
            return self._count(
                error_response(404, "not_found", "Only /v1/ paths are forwarded.", request_id),
                path,
            )
        origin = env.guard.allowed_origin(request.headers)
        if method == "OPTIONS":
            return preflight(request, origin, request_id)
        reply = CIMultiDict({_REQUEST_ID: request_id})
        if origin is not None:
            reply.extend(cors_headers(origin))
        kind = events.kind_of(method, path) if runtime.settings.audit.enabled else None
        call = Call(request, runtime, env, request_id, reply, kind)
        route = self._route
        if route is None or self._routed is not env:
            route = self._new_route(call)
        try:
            # admit: awaited to its end before the exchange starts, so the exchange runs a
            # coroutine frame shallower; every resume of the I/O below walks that chain.
            try:
                refused = await self._admit(call, route)
            except ClusterUnavailable:  # [cluster] in-flight caps or budgets, under on_error = "closed"
                refused = _limits_unavailable(call)
            if refused is not None:
                return self._count(refused, path)
            # forward, which relays the answer as it comes
            read = call.body  # read whole in admission to price a create, or None
            book = self.state.webhooks
            # By method, not call.kind: that is None while the audit is off.
            if book is not None and method == "POST" and path in creates.CREATE_PATHS:
                limit = runtime.settings.server.max_body_bytes
                prepared = await creates.prepared(call, route, book, limit, read)
                if isinstance(prepared, web.Response):
                    return self._count(prepared, path)
                read = prepared
            outcome = await forward(route, call, read)
            failure = outcome.failure
            response = outcome.response if failure is None else _failed(call, failure)
            assert response is not None  # forward() returns an answer or a failure
            # record: a create's line turns its reservation into spend before the release
            claim = record.exchange(self.state, call, outcome)
            if claim is not None:
                await claim  # under [cluster]: which replica writes the terminal line
            return self._count(response, path)
        finally:
            # In-flight slots and budget reservations, however it ended; most calls hold neither.
            if call.slots is not NO_SLOTS or call.hold is not NO_HOLD:
                call.release()

    async def _admit(self, call: Call, route: Route) -> web.Response | None:
        """Rate limits, the audit's health and the body's terms: a refusal, or None.

        Sets `call.user`, the user billed for the request."""
        request = call.request
        runtime = call.runtime
        env = call.env
        method = request.method
        path = request.path
        user = call.user = request.headers.get(env.user_header)
        if route.authenticates:  # before every limit: an unknown client spends nothing
            token = access.authenticate(self.state.tokens, route.token_required, env.name, request.headers)
            if isinstance(token, Refusal):
                return self._token_refused(call, token)
            if token is not None:
                call.client = token.name
                if token.bound_user is not None:  # else the (trusted) header says who
                    user = call.user = token.bound_user
        if runtime.limits.is_limited(env.name, method, path):
            rate_limit = runtime.settings.rate_limit
            if not user:
                if rate_limit.missing_user == "reject":
                    message = f"The {rate_limit.user_header} header is required."
                    return error_response(400, "missing_user", message, call.request_id, headers=call.reply)
                user = call.user = "anonymous"
            try:
                verdict = await runtime.limits.check(env.name, method, path, user)
            except ClusterUnavailable:  # [cluster] on_error = "closed", and Redis is not answering
                call.reply["Retry-After"] = "1"
                message = "The shared rate limits cannot be checked right now. Please retry."
                return error_response(503, "limits_unavailable", message, call.request_id, headers=call.reply)
            if verdict is not None:
                call.reply.extend(verdict.headers)
                if not verdict.allowed:
                    self.state.metrics.rejected(verdict.rule, verdict.scope or "user")
                    if call.kind == "create":
                        record.rejected(self.state, call)
                    return error_response(
                        429,
                        verdict.code or "rate_limited",
                        verdict.message or "Rate limited.",
                        call.request_id,
                        headers=call.reply,
                        extra={"retry_after": verdict.retry_after},
                    )
        if call.kind == "create" and self.state.audit.reject_new:
            message = "The audit trail cannot be written; predictions are paused."
            return error_response(503, "audit_unavailable", message, call.request_id, headers=call.reply)
        failure = body.refusal(request, runtime.settings.server.max_body_bytes)
        if failure is not None:
            return _failed(call, failure)
        if route.capped:
            inflight = runtime.inflight
            if isinstance(inflight, InFlight):
                slots = inflight.enter(env.name, method, path, call.user or "anonymous")
            else:  # [cluster]: counted on Redis
                slots = await inflight.enter(env.name, method, path, call.user or "anonymous")
            if isinstance(slots, TooMany):
                return self._too_many(call, slots)
            call.slots = slots
        if route.budgeted and call.kind == "create":
            if self.state.budgets.shared is None and request.content.is_eof():
                return self._reserve_now(call)  # the usual small body, in with its head
            return await self._reserve(call, route)
        return None

    def _token_refused(self, call: Call, refusal: Refusal) -> web.Response:
        """401 or 403 for the client's token; the token itself is never echoed or logged."""
        request = call.request
        log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote, refusal.code)
        self.state.metrics.refused(call.env.name, refusal.code)
        if refusal.status == 401:
            call.reply.extend(access.CHALLENGE)
        return error_response(
            refusal.status, refusal.code, refusal.message, call.request_id, headers=call.reply
        )

    def _too_many(self, call: Call, over: TooMany) -> web.Response:
        self.state.metrics.refused(call.env.name, "too_many_in_flight")
        call.reply["Retry-After"] = str(over.retry_after)
        return error_response(
            429,
            "too_many_in_flight",
            over.message,
            call.request_id,
            headers=call.reply,
            extra={"retry_after": over.retry_after},
        )

    def _reserve_now(self, call: Call) -> web.Response | None:
        """`_reserve()` for a body already in whole and this process's own budgets: no waiting."""
        pricing = call.runtime.settings.pricing
        estimate = _estimate(call, pricing, body.buffered(call.request)) if pricing else 0.0
        return self._held(call, self.state.budgets.admit(call.env.name, call.user, call.client, estimate))

    async def _reserve(self, call: Call, route: Route) -> web.Response | None:
        """The create's estimate reserved under every budget, or 402 when one would be passed.

        A small body is read now to find its model; one that streams on (or comes
        content-encoded) cannot be priced yet and is reserved at the dearest price."""
        pricing = call.runtime.settings.pricing
        estimate = 0.0
        if pricing:  # without prices every estimate is 0: no need to look at the body
            request = call.request
            if request.content.is_eof():  # the usual small body, in with its head
                estimate = _estimate(call, pricing, body.buffered(request))
            else:
                read = await _before_exchange(call, route, body.read_whole(request))
                if isinstance(read, web.Response):
                    return read
                estimate = _estimate(call, pricing, read)
        budgets = self.state.budgets
        env, user, client = call.env.name, call.user, call.client
        if budgets.shared is None:
            return self._held(call, budgets.admit(env, user, client, estimate))
        # [cluster]: spend and reservations on Redis
        return self._held(call, await budgets.admit_shared(env, user, client, estimate))

    def _held(self, call: Call, held: Hold | Exceeded) -> web.Response | None:
        """None once the create holds its reservation; else the 402 for the budget it would pass."""
        if not isinstance(held, Exceeded):
            call.hold = held
            return None
        self.state.metrics.refused(call.env.name, "budget_exceeded")
        record.rejected(self.state, call, 402)
        call.reply["Retry-After"] = str(held.retry_after)
        message = (
            f"Budget {held.budget} (${held.limit_usd:g} per {held.period}) is spent until {held.resets_at}"
        )
        return error_response(
            402, "budget_exceeded", message, call.request_id, headers=call.reply, extra=held.fields()
        )

    def _new_route(self, call: Call) -> Route:
        """The environment's route under the call's generation: built on its first request."""
        server = call.runtime.settings.server
        route = self._route = Route(
            client=self.client,
            origin=call.env.origin,
            key=call.env.key,
            mask=mask_of(call.env.key.reveal(), call.env.key.fingerprint).encode(),
            scan_success=server.scan_success_bodies,
            user_header=call.env.user_header_raw,
            max_body_bytes=server.max_body_bytes,
            head_timeout=server.upstream_timeout,
            idle_timeout=server.idle_timeout,
            shortest=min(server.upstream_timeout, server.idle_timeout),
            deadlines=self.state.deadlines,
            capped=call.runtime.inflight.is_capped(call.env.name),
            budgeted=self.state.budgets.applies(call.env.name),
            authenticates=call.env.settings.client_auth != "off",
            token_required=call.env.settings.client_auth == "required",
        )
        self._routed = call.env
        return route

    def _refuse(self, refusal: Refusal, request: web.BaseRequest, request_id: str) -> web.StreamResponse:
        log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote, refusal.code)
        return self._count(
            error_response(refusal.status, refusal.code, refusal.message, request_id), request.path
        )

    def _count(self, response: web.StreamResponse, path: str) -> web.StreamResponse:
        self.state.count(self.environment, route_of(path), response.status)
        return response


def _estimate(call: Call, pricing: Mapping[str, float], read: bytes | None) -> float:
    """A create's reserved cost from its body (`read` whole, or None): its model's price, 0
    for a model without one; the dearest price while its model cannot be known yet (the
    body streams on, or comes content-encoded), so nothing slips under."""
    call.body = read
    request = call.request
    if read is not None:
        # Kept for the created line whatever the coding: an identity-coded body names it.
        model = call.model = events.model_in(read)
        if hdrs.CONTENT_ENCODING not in request.headers:  # an istr: not case-folded again
            return pricing.get(model, 0.0) if model is not None else 0.0
    return access.dearest(pricing) if request.body_exists else 0.0


async def _before_exchange(call: Call, route: Route, reading: Coroutine[Any, Any, _T]) -> _T | web.Response:
    """`reading`, which reads the client's body before the exchange and its deadline, within
    one idle_timeout, or 408. On the route's shared sweep, as `creates.prepared` is: no timer
    per request, and a body that came in while the loop was held up is not cut for it."""
    deadline = route.deadlines.arm(route.idle_timeout, Phase.UPLOAD)
    try:
        return await reading
    except asyncio.CancelledError:
        if not deadline.fired:
            raise
        deadline.absorb()
        return _failed(call, BODY_TIMED_OUT)
    finally:
        deadline.finish()


def _limits_unavailable(call: Call) -> web.Response:
    call.reply["Retry-After"] = "1"
    message = "The shared limits cannot be checked right now. Please retry."
    return error_response(503, "limits_unavailable", message, call.request_id, headers=call.reply)


def _failed(call: Call, failure: Failure) -> web.Response:
    """The proxy's own answer: the JSON error, with the headers every answer to the call carries."""
    response = error_response(
        failure.status, failure.code, failure.message, call.request_id, headers=call.reply
    )
    if failure.close:
        response.force_close()
    return response
