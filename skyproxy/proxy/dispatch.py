"""One environment's entry point: the admin paths, or else the proxy.

aiohttp's low-level `web.Server`, not a `web.Application`: one dict lookup tells the two
kinds of path apart, so a router, match info and application plumbing would be work
done on every request for nothing.
"""

from __future__ import annotations

from aiohttp import web

from skyproxy.http1.client import Client
from skyproxy.ops import admin
from skyproxy.proxy.handler import ProxyHandler
from skyproxy.proxy.runtime import State


def create_server(environment: str, state: State, client: Client) -> web.Server:
    admin_paths = admin.routes(environment, state)
    proxy = ProxyHandler(environment, state, client).handle

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        admin_handler = admin_paths.get(request.path)
        if admin_handler is not None:
            return await admin_handler(request)
        return await proxy(request)

    return web.Server(dispatch, access_log=None)
