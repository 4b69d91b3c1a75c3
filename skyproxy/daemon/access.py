"""The daemon's side of client tokens and budgets: load before serving, follow reloads, keep the file.

Both are read from disk in a thread before any listener binds: a tokens file that cannot
be read stops the start (a half-valid config never serves), and budget spend is replayed
from the audit files of the current periods, so the first request is judged on it.
"""

from __future__ import annotations

import asyncio
import logging

from skyproxy.budgets.enforce import Budgets
from skyproxy.config import Settings
from skyproxy.errors import SkyproxyError
from skyproxy.tokens import registry
from skyproxy.tokens.registry import Tokens
from skyproxy.tokens.store import TokenFileError

log = logging.getLogger("skyproxy")


class AccessStartError(SkyproxyError):
    """The tokens file cannot be used; the message names it and why."""


def prepare(settings: Settings) -> tuple[Tokens, Budgets]:
    """The tokens index and the budgets with their spend so far; blocking, so call it in a thread."""
    tokens = Tokens(settings.tokens_file)
    try:
        tokens.load()
    except TokenFileError as exc:
        raise AccessStartError(f"{exc}; fix it, or remove it and make tokens anew") from None
    budgets = Budgets(settings.budgets)
    if settings.budgets:  # only then: a month of audit lines is not read for nothing
        lines = budgets.ledger.replay(settings.audit.path)
        log.info("budgets: %d audit lines of the current periods replayed", lines)
    return tokens, budgets


def reconfigure(tokens: Tokens, budgets: Budgets, settings: Settings) -> None:
    """A reloaded config: another tokens file is read at the next poll; budgets recount from memory."""
    tokens.retarget(settings.tokens_file)
    new = sorted({b.period for b in settings.budgets} - set(budgets.ledger.windows))
    if new:
        log.warning(
            "budgets per %s, new with this reload, count spend from now on; "
            "restart the daemon to count the whole period from the audit files",
            " and ".join(new),
        )
    budgets.reconfigure(settings.budgets)


async def watch_tokens(tokens: Tokens, stop: asyncio.Event) -> None:
    await registry.watch(tokens, stop)


async def close(tokens: Tokens) -> None:
    """Stores the last-used times not yet written."""
    await registry.flush(tokens)
