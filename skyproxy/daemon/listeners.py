"""Each environment's listeners: one low-level aiohttp server, its upstream pool, its sockets.

Binding follows the Runtime: new addresses are bound, removed ones stop accepting and
drain, and an environment that disappears closes its pool once its requests finish.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from aiohttp import web

from skyproxy.config import Listen, ServerSettings
from skyproxy.daemon.connections import ConnectionLimits, GuardedServer
from skyproxy.http1 import Client, Timeouts
from skyproxy.http1.settings import READ_TIMEOUT, WRITE_TIMEOUT
from skyproxy.proxy.dispatch import create_handler
from skyproxy.proxy.runtime import Runtime, State

log = logging.getLogger("skyproxy")
Drain = Callable[[Awaitable[None]], None]


@dataclass
class _Environment:
    runner: web.ServerRunner
    server: GuardedServer
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
        self.max_connections = 1  # per listener; set by the supervisor from config and fd limit

    @property
    def clients(self) -> dict[str, Client]:
        return {name: env.client for name, env in self._envs.items()}

    def client_connections(self) -> dict[str, int]:
        """Open client connections per listener address."""
        counts: dict[str, int] = {}
        for env in self._envs.values():
            for (host, port), count in env.server.open_connections().items():
                counts[f"[{host}]:{port}" if ":" in host else f"{host}:{port}"] = count
        return counts

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
            # A reload may change these; keepalive_timeout is fixed for the server's life.
            env.client.timeouts = _client_timeouts(runtime.settings.server, env.client.timeouts)
            env.server.limits = self._limits(runtime)
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
        client = Client(_client_timeouts(server, Timeouts()))
        web_server = GuardedServer(
            create_handler(name, state, client),
            self._limits(runtime),
            on_close=state.metrics.client_closed,
            access_log=None,
            # A coded request body goes upstream as the bytes its Content-Encoding describes;
            # a create's webhook is read by decoding it in proxy/creates.py.
            auto_decompress=False,
        )
        runner = web.ServerRunner(web_server, handle_signals=False, shutdown_timeout=server.shutdown_timeout)
        await runner.setup()
        env = self._envs[name] = _Environment(runner, web_server, client)
        return env

    def _limits(self, runtime: Runtime) -> ConnectionLimits:
        server = runtime.settings.server
        return ConnectionLimits(server.header_timeout, server.keepalive_timeout, self.max_connections)

    async def _bind(self, name: str, env: _Environment, listen: Listen) -> str | None:
        site = web.TCPSite(env.runner, listen.host, listen.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EADDRINUSE:
                hint = " (is another skyproxy running? stop it, or change this listen address)"
            elif exc.errno == errno.EADDRNOTAVAIL:
                hint = " (no interface on this machine has that address)"
            return f"environment {name}: cannot listen on {listen}: {exc.strerror or exc}{hint}"
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


def _client_timeouts(server: ServerSettings, timeouts: Timeouts) -> Timeouts:
    """The client's clocks, kept behind the proxy's own deadlines (upstream_timeout until the
    head, idle_timeout inside a body) so that those are what a client sees."""
    return replace(
        timeouts,
        connect=server.connect_timeout,
        read=max(READ_TIMEOUT, server.upstream_timeout + 10, server.idle_timeout + 10),
        write=max(WRITE_TIMEOUT, server.idle_timeout + 10),
    )
