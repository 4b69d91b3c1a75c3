"""Whatever the upstream sends, the key never reaches a client.

Each upstream here echoes the key it received in another place or coding. Every answer
the client gets is scanned for the canary, and most tests also check what the client
does get: the mask, the status, or a 502 with a stable code.
"""

from __future__ import annotations

import pytest
from aiohttp import web
from helpers import assert_no_canary, env_config
from helpers.http import assert_error, host_of, http_head, raw_request

USER = {"X-User-Id": "alice"}


def echo_everything_app(seen: list[str]) -> web.Application:
    """Answers any method on any path with the request it received, key and all."""

    async def echo(request: web.Request) -> web.Response:
        seen.append(request.method)
        return web.Response(text=f"{request.method} {request.path_qs} {dict(request.headers)}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@pytest.mark.parametrize(("method", "target"), [("TRACE", "/v1/models"), ("CONNECT", "/v1/models")])
async def test_trace_and_connect_are_refused_and_never_forwarded(
    method, target, raw_upstream, start_proxy, canary_env
):
    seen: list[str] = []
    proxy = await start_proxy(env_config(await raw_upstream(echo_everything_app(seen))))
    answer = await raw_request(proxy.url, http_head(method, target, [("Host", host_of(proxy.url))]))
    assert_error(501, "method_not_supported", answer)
    assert_no_canary(answer.body.decode("latin-1"), str(answer.headers))
    answer = await raw_request(proxy.url, http_head("GET", "/v1/models", [("Host", host_of(proxy.url))]))
    assert answer.status == 200
    assert seen == ["GET"]
