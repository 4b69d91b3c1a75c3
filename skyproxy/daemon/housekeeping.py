"""The daemon's periodic chores: key ages, idle limiter buckets, the systemd watchdog."""

from __future__ import annotations

import asyncio
import logging

from skyproxy.daemon.notify import Notifier
from skyproxy.keys import ages
from skyproxy.proxy.runtime import Runtime, State

log = logging.getLogger("skyproxy")
LIMIT_SWEEP_SECONDS = 30.0


async def record_key_ages(state: State, runtime: Runtime) -> None:
    """Notes each real key's first sighting, and warns about keys past max_age_days."""
    real = {
        name: env.key for name, env in runtime.environments.items() if env.settings.key.kind != "generated"
    }
    state.key_ages = await asyncio.to_thread(ages.observe, runtime.settings, real)
    limit = runtime.settings.keys.max_age_days
    for name, age in state.key_ages.items():
        if age is not None and age > limit:
            log.warning(
                "environment %s: key %s is %d days old (max_age_days = %d); rotate it: "
                "skyproxy key rotate %s",
                name,
                runtime.environments[name].key.fingerprint,
                age,
                limit,
                name,
            )


def log_key_changes(previous: Runtime, current: Runtime) -> None:
    for name, env in current.environments.items():
        old = previous.environments.get(name)
        if old is None:
            log.info("environment %s added (key %s)", name, env.key.fingerprint)
        elif old.key.fingerprint != env.key.fingerprint:
            log.warning(
                "environment %s: key changed %s -> %s", name, old.key.fingerprint, env.key.fingerprint
            )


async def sweep_limits(state: State) -> None:
    # Inserts already evict a few idle buckets each; this catches users who left.
    while True:
        await asyncio.sleep(LIMIT_SWEEP_SECONDS)
        state.runtime.limits.evict_idle()


async def keep_watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)
