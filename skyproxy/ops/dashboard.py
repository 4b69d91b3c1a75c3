"""The dashboard over HTTP: the page at /-/, its files, and its JSON under /-/api/.

Served on every listener under the admin paths' rules: loopback clients only (plus any
in [server] dashboard_networks), behind the Host/Origin guard. The page's one origin is
its own: a request carrying another Origin, or a cross-site browser fetch, is refused.
The one write, replaying a dead webhook delivery, also needs this process's CSRF token,
which the page carries in a meta tag and sends back as a header: another site can make a
browser send a POST, but not read the page for the token or set the header.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from skyproxy.config import IPNetwork
from skyproxy.dashboard import assets
from skyproxy.dashboard.board import Board
from skyproxy.ops import dashboard_docs as docs
from skyproxy.proxy.guard import ORIGIN_NOT_ALLOWED, is_loopback
from skyproxy.proxy.responses import error_response, request_id_of
from skyproxy.proxy.runtime import State

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
log = logging.getLogger("skyproxy")

CSP = "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
CSRF_HEADER = "X-Skyproxy-Csrf"
REFRESH_EVERY = 0.25  # seconds: polls closer together than this share one read of the audit file
MAX_POST_BYTES = 4096


class Dashboard:
    """The process's dashboard: its history, its CSRF token, and the lock its reads share."""

    def __init__(self, state: State) -> None:
        # Weak: the registry below is keyed by the state, which a strong reference here
        # would keep alive for ever.
        self._state = weakref.ref(state)
        self.board = Board(state.runtime.settings.audit.path, state.metrics)
        self.csrf = secrets.token_urlsafe(32)
        self._lock = asyncio.Lock()
        self._refreshed = -math.inf

    @property
    def state(self) -> State:
        state = self._state()
        if state is None:
            raise RuntimeError("the daemon's state is gone")
        return state

    async def current(self) -> Board:
        """The board with every audit line written so far; the audit file is read in a thread.

        The caller reads the board before its next await, so no thread changes it meanwhile.
        """
        async with self._lock:
            board = self.board
            if not board.built:
                await asyncio.to_thread(board.build)
                board.take_seed()
                self._refreshed = time.monotonic()
            elif time.monotonic() - self._refreshed >= REFRESH_EVERY:
                path = self.state.runtime.settings.audit.path
                if path != board.audit_path:
                    await asyncio.to_thread(board.retarget, path)
                await asyncio.to_thread(board.refresh)
                self._refreshed = time.monotonic()
        return board

    async def run(self) -> None:
        """Builds the history at once, then samples the counters at every whole second."""
        try:
            await self.current()
        except Exception:  # the live charts still work; the page's next poll tries again
            log.exception("dashboard: could not read the audit history")
        while True:
            await asyncio.sleep(1.0 - time.time() % 1.0 + 0.001)
            self.board.traffic.sample()

    @property
    def locked(self) -> bool:
        return self._lock.locked()

    def close(self) -> None:
        self.board.close()


_dashboards: weakref.WeakKeyDictionary[State, Dashboard] = weakref.WeakKeyDictionary()


def dashboard_of(state: State) -> Dashboard:
    found = _dashboards.get(state)
    if found is None:
        found = _dashboards[state] = Dashboard(state)
    return found


async def run(state: State) -> None:
    """The daemon's chore: history built off the event loop, then the traffic sampled."""
    dashboard = dashboard_of(state)
    try:
        await dashboard.run()
    finally:
        if not dashboard.locked:  # else a thread still reads the file: it is closed with the process
            dashboard.close()


def routes(environment: str, state: State) -> dict[str, Handler]:
    """The dashboard's paths; each answers 405 to a method it lacks."""

    def guarded(**methods: Handler) -> Handler:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            request_id = request_id_of(request.headers)
            refusal = _refusal(request, environment, state)
            response: web.StreamResponse
            if refusal is not None:
                response = error_response(refusal[0], refusal[1], refusal[2], request_id)
            elif (handler := methods.get(request.method)) is None:
                response = error_response(
                    405,
                    "method_not_allowed",
                    f"{request.path} answers {', '.join(methods)} only.",
                    request_id,
                )
                response.headers["Allow"] = ", ".join(methods)
            else:
                response = await handler(request)
            _harden(response)
            response.headers.setdefault("X-Request-Id", request_id)
            return response

        return handle

    def static(name: str, content_type: str) -> Handler:
        body = assets.read(name)

        async def serve(request: web.BaseRequest) -> web.StreamResponse:
            response = web.Response(body=body, headers={"Content-Type": content_type})
            response.headers["Cache-Control"] = "no-cache"
            return response

        return serve

    async def page(request: web.BaseRequest) -> web.StreamResponse:
        body = assets.page(dashboard_of(state).csrf)
        response = web.Response(body=body, headers={"Content-Type": "text/html; charset=utf-8"})
        response.headers["Cache-Control"] = "no-store"
        return response

    def api(build: Callable[[Dashboard, Board, web.BaseRequest], Any]) -> Handler:
        async def serve(request: web.BaseRequest) -> web.StreamResponse:
            dashboard = dashboard_of(state)
            board = await dashboard.current()
            document = build(dashboard, board, request)
            if asyncio.iscoroutine(document):
                document = await document
            return _json(document)

        return serve

    async def replay(request: web.BaseRequest) -> web.StreamResponse:
        return await _replay(request, state)

    table: dict[str, Handler] = {"/-/": guarded(GET=page, HEAD=page)}
    for path, (name, content_type) in assets.FILES.items():
        serve = static(name, content_type)
        table[f"/-/{path}"] = guarded(GET=serve, HEAD=serve)
    for name, build in docs.DOCUMENTS.items():
        serve = api(build)
        table[f"/-/api/{name}"] = guarded(GET=serve, HEAD=serve)
    table["/-/api/webhooks/replay"] = guarded(POST=replay)
    return table


# -- who may ask ----------------------------------------------------------------------------


def _refusal(request: web.BaseRequest, environment: str, state: State) -> tuple[int, str, str] | None:
    env = state.runtime.environments.get(environment)
    if env is None:
        return 503, "environment_gone", "This environment was removed by a reload."
    headers = request.headers
    origin = headers.get("Origin")
    if origin is not None:
        if origin.lower() != f"http://{headers.get('Host', '')}".lower():
            return 403, ORIGIN_NOT_ALLOWED, "The dashboard answers its own page only."
        headers = _without_origin(headers)  # our own page: the guard need not know it
    if headers.get("Sec-Fetch-Site") not in (None, "same-origin", "none"):
        return 403, ORIGIN_NOT_ALLOWED, "The dashboard answers its own page only."
    refusal = env.guard.check(headers, request.remote)
    if refusal is not None:
        return refusal.status, refusal.code, refusal.message
    networks = state.runtime.settings.server.dashboard_networks
    if not is_loopback(request.remote) and not _in(request.remote, networks):
        return (
            403,
            "admin_not_allowed",
            "The dashboard answers loopback clients only, unless [server] dashboard_networks allows yours.",
        )
    return None


def _without_origin(headers: CIMultiDictProxy[str]) -> CIMultiDictProxy[str]:
    copy = CIMultiDict(headers)
    copy.popall("Origin", None)
    return CIMultiDictProxy(copy)


def _in(remote: str | None, networks: tuple[IPNetwork, ...]) -> bool:
    if remote is None or not networks:
        return False
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _harden(response: web.StreamResponse) -> None:
    headers = response.headers
    headers["Content-Security-Policy"] = CSP
    headers["X-Frame-Options"] = "DENY"
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers.setdefault("Cache-Control", "no-store")


def _json(document: object) -> web.Response:
    return web.Response(body=orjson.dumps(document), headers={"Content-Type": "application/json"})


# -- the one write --------------------------------------------------------------------------


async def _replay(request: web.BaseRequest, state: State) -> web.StreamResponse:
    request_id = request_id_of(request.headers)
    given = request.headers.get(CSRF_HEADER, "")
    token = dashboard_of(state).csrf
    if request.headers.get("Origin") is None or not hmac.compare_digest(given.encode(), token.encode()):
        return error_response(
            403, "csrf_refused", "Replay needs the dashboard page's own request.", request_id
        )
    hooks = state.runtime.settings.webhooks
    if hooks is None:
        return error_response(404, "webhooks_off", "This daemon has no [webhooks] table.", request_id)
    body = await request.content.read(MAX_POST_BYTES + 1)
    event_id = _event_id(body)
    if event_id is None:
        return error_response(400, "invalid_replay", 'Expected {"id": "<webhook event id>"}.', request_id)
    outcome = await asyncio.to_thread(docs.replay, hooks.store, event_id)
    if isinstance(outcome, str):
        return error_response(409, "replay_refused", outcome, request_id)
    return _json({"ok": True, "id": event_id, "was": outcome[0]})


def _event_id(body: bytes) -> str | None:
    if len(body) > MAX_POST_BYTES:
        return None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    event_id = value.get("id") if isinstance(value, dict) else None
    if not isinstance(event_id, str) or not 0 < len(event_id) <= 200 or not event_id.isprintable():
        return None
    return event_id
