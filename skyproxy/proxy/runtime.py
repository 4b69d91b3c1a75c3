"""The live, swappable state: one `Runtime` generation is what a request runs under.

A reload builds a complete new `Runtime` and swaps one reference, so a request that
started under generation N finishes under N, keys and limits included.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import TYPE_CHECKING

from skyproxy.audit.events import Tracker
from skyproxy.audit.writer import AuditWriter
from skyproxy.budgets.enforce import Budgets
from skyproxy.config import EnvironmentSettings, Settings
from skyproxy.errors import KeySourceError
from skyproxy.http1.client import Origin
from skyproxy.keys.secret import Secret
from skyproxy.keys.sources import resolve
from skyproxy.ops.metrics import Metrics
from skyproxy.proxy.deadlines import Deadlines
from skyproxy.proxy.guard import Guard
from skyproxy.proxy.inflight import InFlight, SharedInFlight
from skyproxy.proxy.limits import Limits
from skyproxy.proxy.shared_limits import SharedLimits
from skyproxy.tokens.registry import Tokens
from skyproxy.webhooks.routes import RouteBook

if TYPE_CHECKING:  # redis is loaded only when [cluster] is configured
    from skyproxy.cluster.backend import InFlightBackend, RateBackend
    from skyproxy.cluster.node import ClusterNode


@dataclass(frozen=True, slots=True)
class EnvRuntime:
    name: str  # a field, not a property of settings: it is read several times a request
    settings: EnvironmentSettings
    key: Secret
    base_url: str
    origin: Origin
    guard: Guard
    user_header: str
    user_header_raw: bytes  # lower case, as raw header names are compared


@dataclass(frozen=True, slots=True)
class Runtime:
    generation: int
    settings: Settings
    loaded_at: datetime
    environments: Mapping[str, EnvRuntime]
    limits: Limits | SharedLimits
    inflight: InFlight | SharedInFlight


def resolve_keys(
    settings: Settings, previous: Runtime | None = None
) -> tuple[dict[str, Secret], dict[str, KeySourceError]]:
    """Every environment's key; blocking (keyring, files), so call it off the event loop."""
    keys: dict[str, Secret] = {}
    errors: dict[str, KeySourceError] = {}
    for name, env in settings.environments.items():
        old = previous.environments.get(name) if previous else None
        if env.key.kind == "generated" and old and old.settings.key.kind == "generated":
            keys[name] = old.key  # a mock's key lives as long as the process
            continue
        try:
            keys[name] = resolve(name, env.key)
        except KeySourceError as exc:
            errors[name] = exc
    return keys, errors


def build_runtime(
    settings: Settings,
    keys: Mapping[str, Secret],
    base_urls: Mapping[str, str],
    generation: int,
    previous: Runtime | None = None,
    shared: RateBackend | None = None,
    caps: InFlightBackend | None = None,
) -> Runtime:
    """`shared` and `caps`: the cluster's rate and in-flight backends, used instead of this
    process's buckets and counts."""
    user_header = settings.rate_limit.user_header
    environments = {
        name: EnvRuntime(
            name=name,
            settings=env,
            key=keys[name],
            base_url=base_urls[name],
            origin=Origin.parse(base_urls[name]),
            guard=Guard(settings.server, (listen.host for listen in env.listen)),
            user_header=user_header,
            user_header_raw=user_header.lower().encode("latin-1"),
        )
        for name, env in settings.environments.items()
    }
    return Runtime(
        generation=generation,
        settings=settings,
        loaded_at=datetime.now(timezone.utc),
        environments=MappingProxyType(environments),
        limits=_limits(settings, previous, shared),
        inflight=_inflight(settings, previous, caps),
    )


def _limits(
    settings: Settings, previous: Runtime | None, shared: RateBackend | None
) -> Limits | SharedLimits:
    if shared is not None:
        return SharedLimits(settings.environments, shared)
    local = previous.limits if previous is not None and isinstance(previous.limits, Limits) else None
    return Limits(settings.environments, previous=local)


def _inflight(
    settings: Settings, previous: Runtime | None, caps: InFlightBackend | None
) -> InFlight | SharedInFlight:
    if caps is not None:
        return SharedInFlight(settings.environments, caps)
    local = previous.inflight if previous is not None and isinstance(previous.inflight, InFlight) else None
    return InFlight(settings.environments, local)


class State:
    """The process's shared services and the current generation, handed to every handler."""

    def __init__(
        self,
        runtime: Runtime,
        audit: AuditWriter,
        metrics: Metrics,
        tokens: Tokens | None = None,
        budgets: Budgets | None = None,
    ) -> None:
        self.runtime = runtime
        self.audit = audit
        self.metrics = metrics
        self.tracker = Tracker()
        self.deadlines = Deadlines()
        self.started = time.monotonic()
        self.last_reload_error: str | None = None
        self.requests: dict[str, int] = {}
        self.key_ages: dict[str, int | None] = {}
        self.reload: Callable[[], Awaitable[str | None]] | None = None
        # Process-wide, not per generation: a revoke or a dollar spent outlives a reload.
        self.tokens = tokens if tokens is not None else Tokens(runtime.settings.tokens_file)
        self.budgets = budgets if budgets is not None else Budgets(runtime.settings.budgets)
        self.webhooks: RouteBook | None = None  # set while [webhooks] is on
        self.cluster: ClusterNode | None = None  # set while [cluster] is on

    def count(self, environment: str, route: str, status: int) -> None:
        self.requests[environment] = self.requests.get(environment, 0) + 1
        self.metrics.request(environment, route, status)
