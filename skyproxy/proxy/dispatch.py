"""One environment's entry point: the admin paths, or else the proxy.

aiohttp's low-level `web.Server`, not a `web.Application`: one dict lookup tells the two
kinds of path apart, so a router, match info and application plumbing would be work
done on every request for nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from skyproxy.http1.client import Client
from skyproxy.ops import admin
from skyproxy.proxy.handler import ProxyHandler
from skyproxy.proxy.runtime import State


def create_handler(
    environment: str, state: State, client: Client
) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """The request handler of one environment's server: its admin paths, else the proxy."""
    admin_paths = admin.routes(environment, state)
    proxy = ProxyHandler(environment, state, client).handle

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        admin_handler = admin_paths.get(request.path)
        if admin_handler is not None:
            return await admin_handler(request)
        return await proxy(request)

    return dispatch
