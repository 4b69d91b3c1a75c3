"""The webhook service as the supervisor runs it: store, receiver listeners, relay.

Start: open the store, resolve the secrets, bind the receiver (with the same head
deadline and connection cap as every listener), start the relay, then hand the proxy
its `RouteBook`. Stop: the receiver stops accepting with the other listeners; then the
relay finishes its attempts in flight within the timeout; the store closes last.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from aiohttp import web

from skyproxy.audit import events
from skyproxy.audit.record import AuditRecord
from skyproxy.config import Settings, WebhookSettings
from skyproxy.daemon.connections import ConnectionLimits, GuardedServer
from skyproxy.keys.secret import Secret
from skyproxy.proxy.record import once_across_replicas
from skyproxy.proxy.runtime import State
from skyproxy.webhooks import secrets
from skyproxy.webhooks.receiver import Arrival, Receiver, ReceiverConfig
from skyproxy.webhooks.relay import Relay, RelayConfig
from skyproxy.webhooks.routes import RouteBook
from skyproxy.webhooks.shared import SharedWebhooks
from skyproxy.webhooks.signing import SigningKeys
from skyproxy.webhooks.stats import WebhookStats
from skyproxy.webhooks.store import Store, StoreThread

if TYPE_CHECKING:
    from skyproxy.cluster.node import ClusterNode

log = logging.getLogger("skyproxy")


class WebhookService:
    def __init__(self, settings: WebhookSettings, state: State, cluster: ClusterNode | None = None) -> None:
        self.settings = settings
        self.state = state
        self.stats = WebhookStats()
        # With [cluster]: routes, receipts and deliveries shared by every replica.
        self._shared = (
            SharedWebhooks(cluster.webhooks, self.stats, fails_open=cluster.connection.fails_open)
            if cluster is not None
            else None
        )
        self._db: StoreThread | None = None
        self._receiver: Receiver | None = None
        self._relay: Relay | None = None
        self._runner: web.ServerRunner | None = None
        self._sites: list[web.TCPSite] = []
        self._claims: set[asyncio.Future[None]] = set()  # terminal lines waiting on the shared claim

    async def start(
        self, settings: Settings, keys: Mapping[str, Secret], limits: ConnectionLimits
    ) -> list[str]:
        """Starts everything; returns the bind failures (the caller refuses to serve then)."""
        hooks = self.settings
        db = self._db = await StoreThread.open(hooks.store)
        verifiers, signing = await self._secrets(settings, keys)
        receiver = self._receiver = Receiver(
            db, ReceiverConfig(verifiers, hooks.max_body_bytes), self.stats, self._stored, self._shared
        )
        server = GuardedServer(
            receiver.handle, limits, on_close=self.state.metrics.client_closed, access_log=None
        )
        runner = self._runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        failures = []
        for listen in hooks.listen:
            site = web.TCPSite(runner, listen.host, listen.port, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                failures.append(f"webhooks: cannot listen on {listen}: {exc.strerror or exc}")
                continue
            self._sites.append(site)
        if failures:
            return failures
        relay = self._relay = Relay(
            db,
            RelayConfig(hooks.allowed_targets, hooks.retry_schedule, signing),
            self.stats,
            queue=self._shared,
        )
        await relay.start()
        if self._shared is not None:
            self._shared.start()
        self.state.webhooks = RouteBook(db, self.public_url(), hooks.allowed_targets, self._shared)
        log.info(
            "webhooks: receiving on %s as %s; store %s",
            ", ".join(self.addresses()),
            self.public_url(),
            hooks.store,
        )
        return []

    async def _secrets(
        self, settings: Settings, keys: Mapping[str, Secret]
    ) -> tuple[dict[str, tuple[Secret, ...]], SigningKeys]:
        assert self._db is not None
        rotated = await self._db.run(Store.meta, secrets.ROTATED_AT)
        rotated_at = float(rotated) if rotated else None
        verifiers = await asyncio.to_thread(secrets.verifiers, settings, keys)
        signing = await asyncio.to_thread(
            secrets.signing_keys, settings.webhooks or self.settings, rotated_at
        )
        return verifiers, signing

    async def reconfigure(self, settings: Settings, keys: Mapping[str, Secret]) -> None:
        """A reload: new keys, secrets, targets and schedule. Listen and store stay until a restart."""
        hooks = settings.webhooks
        if hooks is None or self._receiver is None or self._relay is None or self._db is None:
            return
        if hooks.listen != self.settings.listen or hooks.store != self.settings.store:
            log.warning("webhooks: listen and store changes take effect at the next restart")
        verifiers, signing = await self._secrets(settings, keys)
        self._receiver.config = ReceiverConfig(verifiers, hooks.max_body_bytes)
        self._relay.config = RelayConfig(hooks.allowed_targets, hooks.retry_schedule, signing)
        self.state.webhooks = RouteBook(self._db, self.public_url(hooks), hooks.allowed_targets, self._shared)

    def addresses(self) -> list[str]:
        if self._runner is None:
            return []
        found = []
        for address in self._runner.addresses:
            host, port = address[:2]
            found.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return found

    def public_url(self, hooks: WebhookSettings | None = None) -> str:
        hooks = hooks or self.settings
        if hooks.public_url:
            return hooks.public_url
        # Local use (the mock, an app on this machine): the first address as bound.
        return f"http://{self.addresses()[0]}" if self.addresses() else "http://127.0.0.1"

    def _stored(self, arrival: Arrival) -> None:
        if self._relay is not None:
            self._relay.wake()
        task = _audit_terminal(self.state, arrival)
        if task is not None:
            self._claims.add(task)
            task.add_done_callback(self._claims.discard)

    async def stop_accepting(self) -> None:
        self.state.webhooks = None
        for site in self._sites:
            await site.stop()

    async def close(self, timeout: float) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._claims:
            # Each is bounded by [cluster] timeout_ms; its line goes in before the audit flush.
            await asyncio.gather(*self._claims, return_exceptions=True)
        if self._relay is not None:
            await self._relay.stop(timeout)
        if self._shared is not None:
            await self._shared.stop()  # after the relay: its attempts in flight keep their claims
        if self._db is not None:
            await self._db.close()
        self._db = None


def _audit_terminal(state: State, arrival: Arrival) -> asyncio.Future[None] | None:
    """The prediction's terminal audit line, unless a poll (or an earlier event) wrote it;
    under [cluster], the shared claim to await first."""
    prediction = arrival.body.prediction
    terminal = events.status_of(prediction)
    pid = arrival.body.prediction_id
    if terminal is None or pid is None or not state.tracker.first_terminal(pid):
        return None
    runtime = state.runtime
    env = runtime.environments.get(arrival.environment)
    model = events.model_of(prediction) or state.tracker.origin(pid)[0]
    cost = events.credits_of(prediction)
    if cost is None and model is not None:
        cost = runtime.settings.pricing.get(model)
    record = AuditRecord(
        environment=arrival.environment,
        userId=arrival.route.user_id,
        predictionId=pid,
        model=model,
        status=terminal,
        httpStatus=200,
        latencyMs=None,
        costUsd=cost,
        ipAddress=None,
        requestId=arrival.route.request_id or arrival.event_id,
        keyFingerprint=env.key.fingerprint if env else None,
        method="POST",
        path=f"/hooks/{arrival.environment}",  # the route id stays out: it is a capability
    )
    claim = once_across_replicas(state, pid, functools.partial(_submit, state, record))
    return None if claim is None else asyncio.ensure_future(claim)


def _submit(state: State, record: AuditRecord) -> None:
    state.metrics.prediction(record.environment, record.status)
    if not state.audit.submit(record):
        log.error("audit queue full: a %s line for %s was dropped", record.status, record.predictionId)
