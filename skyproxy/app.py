"""create_app(): one aiohttp Application per environment, bound to its name."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from skyproxy import admin
from skyproxy.handler import ProxyHandler
from skyproxy.runtime import State
from skyproxy.upstream import UPSTREAM, open_client

ENVIRONMENT = web.AppKey("environment", str)


def create_app(environment: str, state: State) -> web.Application:
    settings = state.runtime.settings
    # Bodies stream through; aiohttp's own body limit only guards handlers that read whole bodies.
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    app[ENVIRONMENT] = environment
    app.add_routes(admin.routes(environment, state))
    app.router.add_route("*", "/{tail:.*}", ProxyHandler(environment, state).handle)

    async def upstream_client(app: web.Application) -> AsyncIterator[None]:
        # One pool for the environment's whole life: connections are kept alive.
        client = open_client(state.runtime.settings.server)
        app[UPSTREAM] = client
        yield
        await client.close()

    app.cleanup_ctx.append(upstream_client)
    return app
