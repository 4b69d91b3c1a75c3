"""The tokens the daemon accepts: an index by hash, swapped whole when the file changes.

`verify()` is on the hot path: one SHA-256, one dict lookup and one constant-time
compare, whatever the outcome. An unknown, revoked (removed) or expired token takes the
same steps and gets the same answer, so neither the reply nor its timing tells them
apart. File work (reading on change, writing last-used times) happens in threads.

A value that verified is remembered with the index it verified against, so a client
sending its token on every request is hashed about once a minute (when its last-used
time is due), not on every request. Only tokens that verified are remembered (at most
one per token, so the memory is bounded by the file), and they go with their index: a
reload forgets them all. A remembered token is never kept past its expiry: it then goes
the full way and fails like any unknown one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from hashlib import sha256
from pathlib import Path
from types import MappingProxyType

from skyproxy.tokens import store
from skyproxy.tokens.token import MAX_LENGTH

log = logging.getLogger("skyproxy.tokens")

LAST_USED_EVERY = 60.0  # seconds: a token's last-used time is stored at most this often
_NEVER = -math.inf
POLL_SECONDS = 0.5  # the file is checked this often, so a revoke applies within a second


@dataclass(frozen=True, slots=True)
class Token:
    """A token the daemon accepts, as the hot path needs it."""

    name: str
    digest: bytes
    environments: frozenset[str]
    user: str | None
    trust_user_header: bool
    expires_at: float  # seconds since the epoch; inf: never
    bound_user: str | None  # the bound user, else the name; None: the header (trusted) says

    def user_id(self, header: str | None) -> str | None:
        """Who the request is for: the bound user, the header (if trusted), or the name."""
        return header if self.bound_user is None else self.bound_user


# Compared against when a hash is unknown, so every lookup does the same work.
_NOBODY = Token("", bytes(32), frozenset(), None, False, -math.inf, None)


def _entry(record: store.TokenRecord) -> Token:
    bound = record.user if record.user is not None else None if record.trust_user_header else record.name
    return Token(
        name=record.name,
        digest=bytes.fromhex(record.digest_hex),
        environments=record.environments,
        user=record.user,
        trust_user_header=record.trust_user_header,
        expires_at=math.inf if record.expires is None else record.expires.timestamp(),
        bound_user=bound,
    )


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:  # gone, or unreadable: load() then says which, and the watcher lives on
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


class Tokens:
    """Every accepted token of one tokens file, by hash."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self.loaded_at: float | None = None
        self._index: MappingProxyType[bytes, Token] = MappingProxyType({})
        # The index and the values verified against it, swapped together by one assignment:
        # load() runs in a thread, and a value verified against an old index must not land
        # in the new one's memory.
        self._table: tuple[MappingProxyType[bytes, Token], dict[str, tuple[Token, float]]] = (self._index, {})
        self._signature: tuple[int, int, int, int] | None = None
        self._stale = True  # load at the next refresh, whatever the file's signature
        self._used: dict[bytes, float] = {}  # last use, in memory
        self._stored: dict[bytes, float] = {}  # last use as last written to the file
        self.checks = 0  # looks at the file, for tests and status
        self.problem: str | None = None  # why the last reload failed, if it did

    def __len__(self) -> int:
        return len(self._index)

    # -- the hot path ---------------------------------------------------------------------
    def verify(self, presented: str) -> Token | None:
        """The token for a presented value, or None: unknown, revoked and expired alike."""
        index, verified = self._table
        now = self.clock()
        remembered = verified.get(presented)
        if remembered is not None and now < remembered[1]:
            return remembered[0]
        digest = sha256(presented[:MAX_LENGTH].encode("utf-8", "surrogateescape")).digest()  # digest_of()
        entry = index.get(digest, _NOBODY)
        same = hmac.compare_digest(entry.digest, digest)
        if not (same and now < entry.expires_at):
            verified.pop(presented, None)
            return None
        used = self._used.get(digest, _NEVER)
        if now - used >= LAST_USED_EVERY:
            used = self._used[digest] = now
        if len(presented) <= MAX_LENGTH:  # a longer value hashes as its prefix: not kept
            # Until its expiry or its next last-used time, whichever comes first: then the
            # full way again, so one check serves both.
            verified[presented] = (entry, min(entry.expires_at, used + LAST_USED_EVERY))
        return entry

    def listing(self) -> list[tuple[Token, float | None]]:
        """Every accepted token with its last use (seconds since the epoch), for the dashboard."""
        found = []
        for digest, entry in self._index.items():
            used = max(self._used.get(digest, -math.inf), self._stored.get(digest, -math.inf))
            found.append((entry, used if used > -math.inf else None))
        return sorted(found, key=lambda item: item[0].name)

    # -- loading (blocking: call in a thread) ----------------------------------------------
    def load(self) -> None:
        """Reads the file now. Raises TokenFileError and keeps the old index."""
        signature = _signature(self.path)
        records = store.read(self.path)
        index = {}
        for record in records:
            entry = _entry(record)
            index[entry.digest] = entry
            if record.last_used is not None:
                self._stored.setdefault(entry.digest, record.last_used.timestamp())
        self._index = MappingProxyType(index)
        self._table = (self._index, {})
        self._signature = signature
        self._stale = False
        self.loaded_at = self.clock()

    def changed(self) -> bool:
        """Whether the file needs loading: one stat, cheap enough to call on the event loop."""
        self.checks += 1
        return self._stale or _signature(self.path) != self._signature

    def refresh(self) -> bool:
        """Reloads if the file changed since the last load; True if it did."""
        self.checks += 1
        if not self._stale and _signature(self.path) == self._signature:
            return False
        self.load()
        return True

    def retarget(self, path: Path) -> None:
        """Follows a config reload that names another tokens file: it is read at the next refresh."""
        if path != self.path:
            self.path = path
            self._stale = True

    def flush_last_used(self) -> bool:
        """Stores last-used times that moved since the last write; True if the file changed."""
        # A copy first: this runs in a thread while verify() adds first uses on the loop.
        used = list(self._used.items())
        due = {d: t for d, t in used if t > self._stored.get(d, -math.inf)}
        if not due:
            return False
        moments = {d.hex(): datetime.fromtimestamp(t, timezone.utc) for d, t in due.items()}
        changed = store.record_last_used(self.path, moments)
        self._stored.update(due)
        return changed


async def watch(tokens: Tokens, stop: asyncio.Event, poll: float = POLL_SECONDS) -> None:
    """Reloads the tokens file when it changes, and writes last-used times once a minute.

    A cheap stat poll rather than a file watcher: the file is replaced by rename, which
    changes its inode, so no change is missed between two looks.
    """
    next_flush = time.monotonic() + LAST_USED_EVERY
    while not stop.is_set():
        await _refresh(tokens)
        if time.monotonic() >= next_flush:
            next_flush = time.monotonic() + LAST_USED_EVERY
            await flush(tokens)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), poll)
    await flush(tokens)


async def _refresh(tokens: Tokens) -> None:
    # The stat on the loop: a thread woken twice a second for it would cost the requests
    # of that moment more than the stat itself.
    if not tokens.changed():
        return
    try:
        changed = await asyncio.to_thread(tokens.refresh)
    except store.TokenFileError as exc:
        if str(exc) != tokens.problem:  # once per distinct problem, not every poll
            log.error("%s; still using the %d tokens loaded before", exc, len(tokens))
        tokens.problem = str(exc)
        return
    if changed:
        tokens.problem = None
        log.info("tokens file %s loaded: %d tokens", tokens.path, len(tokens))


async def flush(tokens: Tokens) -> None:
    try:
        await asyncio.to_thread(tokens.flush_last_used)
    except (OSError, store.TokenFileError) as exc:
        log.warning("cannot store token last-used times in %s: %s", tokens.path, exc)
