"""The /-/ admin endpoints: answered on every listener, to loopback clients only."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from skyproxy import __version__
from skyproxy.cluster.errors import ClusterUnavailable
from skyproxy.keys import nodump
from skyproxy.ops import dashboard
from skyproxy.ops.metrics import CONTENT_TYPE
from skyproxy.ops.shared_budgets import shared_report
from skyproxy.proxy.guard import is_loopback
from skyproxy.proxy.responses import error_response, request_id_of
from skyproxy.proxy.runtime import State

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def routes(environment: str, state: State) -> dict[str, Handler]:
    """The admin paths and their handlers; each answers 405 to a method it lacks."""

    def guarded(handler: Handler) -> Handler:
        async def wrapper(request: web.BaseRequest) -> web.StreamResponse:
            request_id = request_id_of(request.headers)
            env = state.runtime.environments.get(environment)
            refusal = env.guard.check(request.headers, request.remote) if env else None
            if refusal is not None:
                return error_response(refusal.status, refusal.code, refusal.message, request_id)
            if not is_loopback(request.remote):
                return error_response(
                    403,
                    "admin_not_allowed",
                    "Admin endpoints answer loopback clients only.",
                    request_id,
                )
            response = await handler(request)
            response.headers.setdefault("X-Request-Id", request_id)
            return response

        return wrapper

    async def health(request: web.BaseRequest) -> web.Response:
        cluster = state.cluster
        if cluster is not None and cluster.degraded:
            # Under on_error = "closed" limited requests are refused: take this replica out.
            body = {"status": "degraded", "cluster": "unavailable"}
            return web.json_response(body, status=503 if cluster.refuses else 200)
        return web.json_response({"status": "ok"})

    async def status(request: web.BaseRequest) -> web.Response:
        return web.json_response(status_document(state), dumps=_dumps)

    async def metrics(request: web.BaseRequest) -> web.Response:
        body = state.metrics.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def budgets(request: web.BaseRequest) -> web.Response:
        # Live spend and reservations: what `skyproxy budget show` prints while the daemon runs.
        settings = state.runtime.settings
        if settings.cluster is None or not settings.budgets:
            return web.json_response({"source": "daemon", "budgets": state.budgets.snapshot()}, dumps=_dumps)
        if state.cluster is None:  # [cluster] in the config, and the node not up yet
            message = "Redis is not connected yet."
            return error_response(503, "limits_unavailable", message, request_id_of(request.headers))
        try:  # [cluster]: every replica's figures, as they admit creates, not this one's lines alone
            source, rows = await shared_report(settings, state.cluster)
        except ClusterUnavailable:
            message = "The shared budgets cannot be read from Redis right now. Please retry."
            return error_response(503, "limits_unavailable", message, request_id_of(request.headers))
        return web.json_response({"source": source, "budgets": rows}, dumps=_dumps)

    async def reload(request: web.BaseRequest) -> web.Response:
        if state.reload is None:
            return error_response(503, "reload_unavailable", "Reload is not available.", "-")
        error = await state.reload()
        runtime = state.runtime
        body = {"ok": error is None, "generation": runtime.generation, "error": error}
        return web.json_response(body, status=200 if error is None else 409)

    def path(**methods: Handler) -> Handler:
        async def by_method(request: web.BaseRequest) -> web.StreamResponse:
            handler = methods.get(request.method)
            if handler is None:
                return _not_allowed(request, methods)
            return await handler(request)

        return guarded(by_method)

    return {
        "/-/health": path(GET=health, HEAD=health),
        "/-/status": path(GET=status, HEAD=status),
        "/-/metrics": path(GET=metrics, HEAD=metrics),
        "/-/reload": path(POST=reload),
        "/-/budgets": path(GET=budgets, HEAD=budgets),
        **dashboard.routes(environment, state),  # /-/ and /-/api/: its own guard and headers
    }


def _not_allowed(request: web.BaseRequest, methods: dict[str, Handler]) -> web.StreamResponse:
    allowed = ", ".join(methods)
    message = f"{request.path} answers {allowed} only."
    response = error_response(405, "method_not_allowed", message, request_id_of(request.headers))
    response.headers["Allow"] = allowed
    return response


def status_document(state: State) -> dict[str, object]:
    runtime = state.runtime
    environments = {}
    for name, env in runtime.environments.items():
        environments[name] = {
            "listen": [str(listen) for listen in env.settings.listen],
            "upstream": env.settings.upstream,
            "key": {
                "source": str(env.settings.key),
                "fingerprint": env.key.fingerprint,
                "age_days": state.key_ages.get(name),
            },
            "requests": state.requests.get(name, 0),
        }
    document: dict[str, object] = {
        "version": __version__,
        "uptime_s": round(time.monotonic() - state.started, 3),
        "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        # False: no core dump, and no other process of this user can read the keys in memory.
        "dumpable": nodump.dumpable(),
        "config": {
            "path": str(runtime.settings.path),
            "generation": runtime.generation,
            "loaded_at": runtime.loaded_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "last_reload_error": state.last_reload_error,
        },
        "environments": environments,
        "tokens": {
            "file": str(state.tokens.path),
            "count": len(state.tokens),
            "problem": state.tokens.problem,
        },
        "audit": {
            "path": str(runtime.settings.audit.path),
            "queue_depth": state.audit.depth,
            "healthy": state.audit.healthy,
        },
    }
    if state.cluster is not None:
        document["cluster"] = state.cluster.status()
    hooks = state.metrics.webhooks
    if hooks is not None:
        age = hooks.oldest_pending_age()
        document["webhooks"] = {
            "outbox_depth": hooks.outbox_depth,
            "oldest_pending_age_s": None if age is None else round(age, 3),
            "received": hooks.received,
            "refused_signature": hooks.refused_signature,
            "duplicates": hooks.duplicates,
            "delivered": hooks.delivered,
            "retried": hooks.retried,
            "dead": hooks.dead,
            "gone": hooks.gone,
        }
    return document


def _dumps(value: object) -> str:
    return json.dumps(value, indent=2)
