"""The raw upstream fixture for the client's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from helpers.raw_upstream import RawUpstream, Script


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Script], Awaitable[RawUpstream]]]:
    """Starts raw upstreams; list it before start_proxy so the proxies stop first."""
    started: list[RawUpstream] = []

    async def start(script: Script) -> RawUpstream:
        upstream = RawUpstream(script)
        await upstream.start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.stop()
