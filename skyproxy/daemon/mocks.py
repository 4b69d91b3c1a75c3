"""The embedded mock upstream: one loopback server per mock environment, kept across reloads."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from skyproxy.config import Settings
from skyproxy.keys.secret import Secret
from skyproxy.mock.app import MOCK_STATE, create_mock_app

Drain = Callable[[Awaitable[None]], None]


class Mocks:
    def __init__(self) -> None:
        self._runners: dict[str, web.AppRunner] = {}

    async def sync(self, settings: Settings, keys: Mapping[str, Secret], drain: Drain) -> dict[str, str]:
        """Starts or updates the mock of each mock environment; returns every base URL."""
        urls: dict[str, str] = {}
        for name, env in settings.environments.items():
            if not env.is_mock:
                urls[name] = env.upstream
                continue
            runner = self._runners.get(name) or await self._start(name, keys[name], settings.mock.delay)
            mock_state = runner.app[MOCK_STATE]
            mock_state.accepted_keys = {keys[name].reveal()}  # a reload may bring a new key
            mock_state.delay = settings.mock.delay
            host, port = runner.addresses[0][:2]
            urls[name] = f"http://{host}:{port}"
        for name in list(self._runners):
            kept = settings.environments.get(name)
            if kept is None or not kept.is_mock:
                drain(self._runners.pop(name).cleanup())
        return urls

    async def _start(self, name: str, key: Secret, delay: float) -> web.AppRunner:
        runner = web.AppRunner(create_mock_app([key.reveal()], delay), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self._runners[name] = runner
        return runner

    async def close(self) -> None:
        await asyncio.gather(*(runner.cleanup() for runner in self._runners.values()), return_exceptions=True)
        self._runners.clear()
