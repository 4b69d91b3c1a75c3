"""Each environment's listeners: one low-level aiohttp server, its upstream pool, its sockets.

Binding follows the Runtime: new addresses are bound, removed ones stop accepting and
drain, and an environment that disappears closes its pool once its requests finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from aiohttp import web

from skyproxy.config import Listen
from skyproxy.http1 import Client, Timeouts
from skyproxy.proxy.dispatch import create_server
from skyproxy.proxy.runtime import Runtime, State

log = logging.getLogger("skyproxy")
Drain = Callable[[Awaitable[None]], None]


@dataclass
class _Environment:
    runner: web.ServerRunner
    client: Client  # the upstream pool, for the environment's whole life
    sites: dict[Listen, web.TCPSite] = field(default_factory=dict)

    async def close(self) -> None:
        """Stops the listeners, lets in-flight requests finish, then closes the pool."""
        try:
            await self.runner.cleanup()
        finally:
            await self.client.close()


class Listeners:
    def __init__(self) -> None:
        self._envs: dict[str, _Environment] = {}

    @property
    def clients(self) -> dict[str, Client]:
        return {name: env.client for name, env in self._envs.items()}

    def addresses(self, environment: str) -> list[str]:
        """The addresses actually bound for an environment, with real ports for port 0."""
        env = self._envs.get(environment)
        if env is None:
            return []
        found = []
        for address in env.runner.addresses:
            host, port = address[:2]
            found.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return found

    async def sync(self, runtime: Runtime, state: State, drain: Drain) -> list[str]:
        """Binds new addresses and stops removed ones; returns the bind errors."""
        for name in set(self._envs) - set(runtime.environments):
            log.info("environment %s removed; its listeners stop accepting", name)
            drain(self._envs.pop(name).close())
        failures: list[str] = []
        for name, env_rt in runtime.environments.items():
            env = self._envs.get(name) or await self._create(name, runtime, state)
            connect = runtime.settings.server.connect_timeout  # a reload may change it
            env.client.timeouts = replace(env.client.timeouts, connect=connect)
            wanted = set(env_rt.settings.listen)
            for listen in set(env.sites) - wanted:
                log.info("environment %s stops listening on %s", name, listen)
                drain(env.sites.pop(listen).stop())
            for listen in env_rt.settings.listen:
                if listen not in env.sites:
                    failure = await self._bind(name, env, listen)
                    if failure:
                        failures.append(failure)
        return failures

    async def _create(self, name: str, runtime: Runtime, state: State) -> _Environment:
        server = runtime.settings.server
        client = Client(Timeouts(connect=server.connect_timeout))
        runner = web.ServerRunner(
            create_server(name, state, client), handle_signals=False, shutdown_timeout=server.shutdown_timeout
        )
        await runner.setup()
        env = self._envs[name] = _Environment(runner, client)
        return env

    async def _bind(self, name: str, env: _Environment, listen: Listen) -> str | None:
        site = web.TCPSite(env.runner, listen.host, listen.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            return f"environment {name}: cannot listen on {listen}: {exc.strerror or exc}"
        env.sites[listen] = site
        return None

    async def stop_accepting(self) -> None:
        for env in self._envs.values():
            for site in list(env.sites.values()):
                await site.stop()

    async def close(self) -> None:
        """Lets in-flight requests finish everywhere together, then closes every pool."""
        await asyncio.gather(*(env.close() for env in self._envs.values()), return_exceptions=True)
        self._envs.clear()
