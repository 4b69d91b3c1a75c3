"""Client connections cannot starve the daemon: a head deadline and a cap per listener.

aiohttp closes an idle keep-alive connection after `keepalive_timeout`, but a fresh
connection that never completes its request head is kept for as long as the client
likes, so slow-header clients ("slowloris") could hold every file descriptor. Here
each new connection must deliver a complete head within `header_timeout` (else 408 and
close; a head that arrived in time but was not yet read, the loop being held up, is
still served), and a listener holds at most `max_connections`. When full, the connection that
has waited longest for its head is shed (503 `connection_shed`) to make room: those are
the cheapest to lose, and a real client then still gets in. Only when every connection
is serving a request is a newcomer answered 503 `too_many_connections`. A connection
answered either way never has a request forwarded, even one whose head had arrived.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from random import getrandbits
from typing import Any

from aiohttp import web

from skyproxy.proxy.deadlines import LOOKS

log = logging.getLogger("skyproxy")
Listener = tuple[str, int]
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
WARN_EVERY = 10.0  # seconds between two warnings about a full listener


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float
    keepalive_timeout: float
    max_connections: int  # per listener


def _answer(status: int, reason: str, code: str, message: str) -> bytes:
    request_id = f"{getrandbits(96):024x}"
    body = (f'{{"error":{{"code":"{code}","message":"{message}","request_id":"{request_id}"}}}}').encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-Id: {request_id}\r\nConnection: close\r\n"
    )
    if status == 503:
        head += "Retry-After: 1\r\n"
    return head.encode() + b"\r\n" + body


_TIMED_OUT = _answer(408, "Request Timeout", "header_timeout", "The request head did not arrive in time.")
_SHED = _answer(
    503,
    "Service Unavailable",
    "connection_shed",
    "The listener is at max_connections; this connection had sent no request yet. Retry.",
)
_FULL = _answer(503, "Service Unavailable", "too_many_connections", "Too many open connections; retry.")


async def _dropped() -> web.StreamResponse:
    return web.Response(status=499)  # never sent: the connection is closing


class GuardedServer(web.Server):
    """aiohttp's low-level server, with a head deadline and a per-listener connection cap."""

    def __init__(
        self,
        handler: Handler,
        limits: ConnectionLimits,
        on_close: Callable[[Listener, str], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, keepalive_timeout=limits.keepalive_timeout, **kwargs)
        self.limits = limits
        self._inner = handler
        self.request_handler = self._first_request
        self._on_close = on_close
        self._waiting: dict[web.RequestHandler, tuple[asyncio.TimerHandle, Listener, asyncio.Transport]] = {}
        self._listener_of: dict[web.RequestHandler, Listener] = {}
        self._open: dict[Listener, int] = {}
        self._warned = 0.0

    def open_connections(self) -> dict[Listener, int]:
        return dict(self._open)

    def _first_request(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # Not a coroutine: the inner handler's coroutine is returned as is, no extra frame.
        waiting = self._waiting.pop(request.protocol, None)
        if waiting is not None:
            waiting[0].cancel()
        else:
            transport = request.transport
            if transport is None or transport.is_closing():
                # Answered already (shed, or its head deadline passed) while aiohttp held the
                # parsed head for the next loop turn: the client was told no, so the request
                # must not reach the upstream, where a create would be billed.
                listener = self._listener_of.get(request.protocol)
                if listener is not None:
                    self._closed(listener, "request_dropped")
                return _dropped()
        return self._inner(request)

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        listener: Listener = tuple(transport.get_extra_info("sockname")[:2])
        self._listener_of[handler] = listener
        count = self._open[listener] = self._open.get(listener, 0) + 1
        if count > self.limits.max_connections and not self._shed_one(listener):
            self._refuse(listener, transport)
            return
        timer = asyncio.get_running_loop().call_later(self.limits.header_timeout, self._timed_out, handler)
        self._waiting[handler] = (timer, listener, transport)

    def connection_lost(self, handler: web.RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        waiting = self._waiting.pop(handler, None)
        if waiting is not None:
            waiting[0].cancel()
        listener = self._listener_of.pop(handler, None)
        if listener is not None:
            self._open[listener] -= 1

    def _shed_one(self, listener: Listener) -> bool:
        """Closes the oldest connection of `listener` still waiting for its head."""
        for handler, (timer, where, transport) in self._waiting.items():
            if where == listener:
                timer.cancel()
                del self._waiting[handler]
                transport.write(_SHED)
                transport.close()
                self._closed(listener, "shed")
                return True
        return False

    def _refuse(self, listener: Listener, transport: asyncio.Transport) -> None:
        transport.write(_FULL)
        transport.close()
        self._closed(listener, "refused")
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            log.warning(
                "listener %s:%s is full (max_connections = %d, every one busy): new connections get 503",
                *listener,
                self.limits.max_connections,
            )

    def _timed_out(self, handler: web.RequestHandler, looks: int = LOOKS) -> None:
        if handler not in self._waiting:
            return  # its first request came
        if looks:
            # A loop held up can run this timer before it reads a head that arrived in time:
            # that head gets its turns to reach the handler first, as in proxy/deadlines.py.
            asyncio.get_running_loop().call_soon(self._timed_out, handler, looks - 1)
            return
        _, listener, transport = self._waiting.pop(handler)
        transport.write(_TIMED_OUT)
        transport.close()
        self._closed(listener, "header_timeout")

    def _closed(self, listener: Listener, reason: str) -> None:
        if self._on_close is not None:
            self._on_close(listener, reason)
