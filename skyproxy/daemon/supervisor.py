"""Lifecycle in one place: start, signals, reload and graceful shutdown.

Order at start: keys (and the cluster's Redis URL) resolved, the cluster connection
started, audit writer started, mocks bound, Runtime built, the webhook receiver and
relay started, then listeners bound and READY=1. Order at stop: stop accepting, drain
in-flight requests (up to shutdown_timeout), close the upstream pools, finish the relay's
attempts in flight and close its store, close the cluster connection, drain the audit queue.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from skyproxy.audit.writer import AuditWriter
from skyproxy.config import ClusterSettings, Settings
from skyproxy.daemon import access, fds, housekeeping
from skyproxy.daemon.connections import ConnectionLimits
from skyproxy.daemon.gc import tune_gc
from skyproxy.daemon.listeners import Listeners
from skyproxy.daemon.mocks import Mocks
from skyproxy.daemon.notify import Notifier, watchdog_interval
from skyproxy.daemon.reload import ReloadFailed, digest, prepare, watch_config
from skyproxy.daemon.webhooks import WebhookService
from skyproxy.errors import KeySourceError
from skyproxy.keys import nodump
from skyproxy.ops import dashboard
from skyproxy.ops.metrics import Metrics
from skyproxy.proxy.runtime import Runtime, State, build_runtime, resolve_keys

if TYPE_CHECKING:
    from skyproxy.cluster.node import ClusterNode

log = logging.getLogger("skyproxy")


class StartupError(Exception):
    """Startup could not complete; the message says why, with no key material."""


class Supervisor:
    """Owns every long-lived resource of the daemon and starts and stops them in order."""

    def __init__(
        self, settings: Settings, notifier: Notifier | None = None, *, own_process: bool = False
    ) -> None:
        self._initial = settings
        self._own_process = own_process  # ours alone: tune its GC, raise its fd limit
        self.notifier = notifier
        self.state: State | None = None
        self._audit: AuditWriter | None = None
        self._listeners = Listeners()
        self._mocks = Mocks()
        self.webhooks: WebhookService | None = None
        self.cluster: ClusterNode | None = None
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._draining: set[asyncio.Task[None]] = set()
        self._config_digest: str | None = None  # of the config text last loaded, or tried

    # -- start ----------------------------------------------------------------------------
    async def start(self) -> None:
        settings = self._initial
        if self._own_process:
            fds.raise_soft_limit()
            # Before any key is read: from here on no other process of this user reads them.
            problem = nodump.forbid_dumps()
            if problem is not None:
                log.warning("keys in memory are readable by this user's other processes: %s", problem)
        self._config_digest = await asyncio.to_thread(digest, settings.path)
        keys, errors = await asyncio.to_thread(resolve_keys, settings)
        if errors:
            raise StartupError("\n".join(str(e) for e in errors.values()))
        try:
            tokens, budgets = await asyncio.to_thread(access.prepare, settings)
        except access.AccessStartError as exc:
            raise StartupError(str(exc)) from None
        cluster = self.cluster = await _start_cluster(settings.cluster)
        audit = self._audit = AuditWriter(settings.audit)
        audit.start()
        metrics = Metrics()
        metrics.watch_audit(lambda: audit.depth, lambda: audit.write_failures, lambda: audit.dropped)
        metrics.watch_upstream(lambda: self._listeners.clients)
        metrics.watch_budgets(lambda: budgets.warnings)
        if cluster is not None:
            metrics.watch_cluster(lambda: cluster.connection.errors_total, lambda: cluster.degraded)
        try:
            base_urls = await self._mocks.sync(settings, keys, self._spawn_drain)
            shared = cluster.rates if cluster is not None else None
            caps = cluster.inflight if cluster is not None else None
            runtime = build_runtime(settings, keys, base_urls, generation=1, shared=shared, caps=caps)
            state = self.state = State(runtime, audit, metrics, tokens, budgets)
            state.cluster = cluster
            budgets.shared = cluster.budgets if cluster is not None else None
            state.reload = self.reload
            await housekeeping.record_key_ages(state, runtime)
            # Before the proxy listens: a create's callback may arrive before its answer.
            failures = await self._start_webhooks(settings, keys, state)
            failures = failures or await self._sync_listeners(runtime, state)
        except BaseException:
            await self._close_everything(timeout=0)
            raise
        if failures:
            await self._close_everything(timeout=0)
            raise StartupError("\n".join(failures))
        self._log_started(runtime)
        self._start_chores(state)
        if self._own_process:
            tune_gc()
        if self.notifier:
            self.notifier.ready(f"serving {len(runtime.environments)} environment(s)")

    async def _start_webhooks(self, settings: Settings, keys: dict[str, Any], state: State) -> list[str]:
        if settings.webhooks is None:
            return []
        self.webhooks = WebhookService(settings.webhooks, state, self.cluster)
        server = settings.server
        state.metrics.watch_webhooks(self.webhooks.stats)
        limits = ConnectionLimits(server.header_timeout, server.keepalive_timeout, server.max_connections)
        return await self.webhooks.start(settings, keys, limits)

    def _log_started(self, runtime: Runtime) -> None:
        for env in runtime.environments.values():
            log.info(
                "environment %s listening on %s -> %s (key %s from %s)",
                env.name,
                ", ".join(self.addresses(env.name)),
                env.settings.upstream,
                env.key.fingerprint,
                env.settings.key,
            )

    def _start_chores(self, state: State) -> None:
        self._tasks.append(asyncio.create_task(housekeeping.sweep_limits(state)))
        self._tasks.append(asyncio.create_task(fds.watch()))
        self._tasks.append(asyncio.create_task(access.watch_tokens(state.tokens, self._stop)))
        self._tasks.append(asyncio.create_task(dashboard.run(state)))  # its history, then live samples
        if state.runtime.settings.server.watch_config:
            self._tasks.append(asyncio.create_task(self._watch()))
        interval = watchdog_interval()
        if interval and self.notifier:
            self._tasks.append(asyncio.create_task(housekeeping.keep_watchdog(self.notifier, interval)))

    async def _sync_listeners(self, runtime: Runtime, state: State) -> list[str]:
        count = sum(len(env.settings.listen) for env in runtime.environments.values())
        cap = fds.connection_cap(runtime.settings.server.max_connections, count)
        if cap < runtime.settings.server.max_connections:
            log.info(
                "max_connections lowered from %d to %d per listener to fit the open-file limit (%d)",
                runtime.settings.server.max_connections,
                cap,
                fds.soft_limit(),
            )
        self._listeners.max_connections = cap
        return await self._listeners.sync(runtime, state, self._spawn_drain)

    def addresses(self, environment: str) -> list[str]:
        """The addresses actually bound for an environment, with real ports for port 0."""
        return self._listeners.addresses(environment)

    def client_connections(self) -> dict[str, int]:
        return self._listeners.client_connections()

    def _spawn_drain(self, work: Awaitable[Any]) -> None:
        async def run() -> None:
            await work

        task = asyncio.create_task(run())
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    # -- reload ---------------------------------------------------------------------------
    async def reload(self) -> str | None:
        """Reloads the config file; returns None on success or the error reported."""
        assert self.state is not None
        async with self._reload_lock:
            if self.notifier:
                self.notifier.reloading()
            try:
                return await self._reload(self.state)
            finally:
                if self.notifier:
                    self.notifier.ready()

    async def _reload(self, state: State) -> str | None:
        previous = state.runtime
        # Taken before the load: a change racing with it is seen again, never missed.
        self._config_digest = await asyncio.to_thread(digest, previous.settings.path)
        try:
            settings, keys = await prepare(previous.settings.path, previous)
        except ReloadFailed as exc:
            state.last_reload_error = str(exc)
            log.error("reload failed, still serving generation %d: %s", previous.generation, exc)
            if self.notifier:
                self.notifier.status(f"reload failed, still serving generation {previous.generation}")
            return str(exc)
        base_urls = await self._mocks.sync(settings, keys, self._spawn_drain)
        shared = self.cluster.rates if self.cluster is not None else None
        caps = self.cluster.inflight if self.cluster is not None else None
        runtime = build_runtime(settings, keys, base_urls, previous.generation + 1, previous, shared, caps)
        state.audit.reconfigure(settings.audit)
        access.reconfigure(state.tokens, state.budgets, settings)
        state.runtime = runtime  # the swap: new requests see the new generation
        state.last_reload_error = None  # in the same step, so status never mixes the two
        if self.webhooks is not None:
            await self.webhooks.reconfigure(settings, keys)
        if (settings.webhooks is None) != (self.webhooks is None):
            log.warning("adding or removing [webhooks] takes effect at the next restart")
        if settings.cluster != self._initial.cluster:
            log.warning("a change to [cluster] takes effect at the next restart")
        await housekeeping.record_key_ages(state, runtime)
        failures = await self._sync_listeners(runtime, state)
        if failures:
            state.last_reload_error = "; ".join(failures)
            log.error("reload applied as generation %d, but: %s", runtime.generation, state.last_reload_error)
            return state.last_reload_error
        log.info("reloaded %s as generation %d", settings.path, runtime.generation)
        housekeeping.log_key_changes(previous, runtime)
        return None

    async def _watch(self) -> None:
        assert self.state is not None
        await watch_config(
            self.state.runtime.settings.path, self.reload, self._stop, lambda: self._config_digest
        )

    # -- run and stop ---------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Serves until SIGTERM or SIGINT; SIGHUP reloads, SIGUSR1 reopens the audit file."""
        loop = asyncio.get_running_loop()
        handlers: dict[signal.Signals, Any] = {
            signal.SIGTERM: self.request_stop,
            signal.SIGINT: self.request_stop,
            signal.SIGHUP: lambda: self._spawn_drain(self.reload()),
            signal.SIGUSR1: self._reopen_audit,
        }
        installed: list[signal.Signals] = []
        try:
            for sig, handler in handlers.items():
                loop.add_signal_handler(sig, handler)
                installed.append(sig)
            await self.start()
            await self._stop.wait()
            log.info("stopping: draining in-flight requests")
        finally:
            # Released before the drain, a second SIGTERM or SIGINT ends a drain that
            # hangs. SIGUSR1 (logrotate's) is kept until the end: unhandled, it would
            # kill the process and lose the audit lines still queued.
            for sig in installed:
                if sig != signal.SIGUSR1:
                    loop.remove_signal_handler(sig)
            try:
                await self.stop()
            finally:
                if signal.SIGUSR1 in installed:
                    loop.remove_signal_handler(signal.SIGUSR1)
        log.info("stopped")

    def _reopen_audit(self) -> None:
        if self.state is not None:
            self.state.audit.reopen()
            log.info("audit file reopened (SIGUSR1)")

    async def stop(self) -> None:
        if self.notifier:
            self.notifier.stopping()
        timeout = self._initial.server.shutdown_timeout
        if self.state is not None:
            timeout = self.state.runtime.settings.server.shutdown_timeout
        self._stop.set()
        await self._close_everything(timeout)

    async def _close_everything(self, timeout: float) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        # Stop accepting everywhere first, then let in-flight requests finish together.
        await self._listeners.stop_accepting()
        if self.webhooks is not None:
            await self.webhooks.stop_accepting()
        await self._listeners.close()
        if self._draining:
            await asyncio.wait(self._draining, timeout=max(timeout, 0.1))
        if self.webhooks is not None:
            await self.webhooks.close(timeout)  # the relay's attempts in flight, then the store
            self.webhooks = None
        if self.cluster is not None:
            await self.cluster.close()
            self.cluster = None
        await self._mocks.close()
        if self.state is not None:
            await self.state.deadlines.close()
            await access.close(self.state.tokens)
        if self._audit is not None:
            lost = await asyncio.to_thread(self._audit.close, max(timeout, 10.0))
            self._audit = None
            if lost:
                log.error("%d audit lines could not be written before exit", lost)


async def _start_cluster(settings: ClusterSettings | None) -> ClusterNode | None:
    """The connection to the shared Redis; one that is down starts an outage, not a failure."""
    if settings is None:
        return None
    from skyproxy.cluster.node import ClusterNode  # redis is loaded only with [cluster]
    from skyproxy.cluster.url import resolve_url

    try:
        url = await asyncio.to_thread(resolve_url, settings)
    except KeySourceError as exc:
        raise StartupError(str(exc)) from None
    node = ClusterNode(settings, url)
    await node.start()
    log.info("cluster: limits shared through Redis %s (on_error=%s)", url.shown, settings.on_error)
    return node
