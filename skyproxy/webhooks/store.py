"""The durable store: routes, received events, and the outbox of deliveries, in SQLite.

WAL with `synchronous=FULL` fsyncs the log at every commit, so once a method returns
its change survives a crash or SIGKILL. `Store` is plain blocking code, used as is by
the CLI; the daemon runs it on one thread of its own through `StoreThread`, so no
SQLite call ever runs on the event loop. Other processes (`webhooks replay`) may write
at the same time: WAL lets them, and the busy timeout waits out a running commit.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

from skyproxy.errors import SkyproxyError
from skyproxy.webhooks import targets

Status = Literal["pending", "delivered", "dead", "gone"]
STATUSES: tuple[Status, ...] = ("pending", "delivered", "dead", "gone")
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS routes (
    id TEXT PRIMARY KEY,
    environment TEXT NOT NULL,
    target TEXT NOT NULL,
    events TEXT NOT NULL,
    user_id TEXT,
    request_id TEXT,
    created_at REAL NOT NULL,
    gone_at REAL
);
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    route_id TEXT NOT NULL REFERENCES routes(id),
    body_sha256 TEXT NOT NULL,
    body BLOB NOT NULL,
    content_type TEXT NOT NULL,
    prediction_id TEXT,
    event TEXT,
    received_at REAL NOT NULL,
    UNIQUE (route_id, body_sha256)
);
CREATE TABLE IF NOT EXISTS deliveries (
    event_id TEXT PRIMARY KEY REFERENCES events(id),
    origin TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead', 'gone')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    queued_at REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt_at);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreError(SkyproxyError):
    """The store cannot be opened, or refuses an operation; the message says which."""


@dataclass(frozen=True, slots=True)
class Route:
    id: str
    environment: str
    target: str
    events: tuple[str, ...] | None
    user_id: str | None
    request_id: str | None
    created_at: float
    gone: bool = False


@dataclass(frozen=True, slots=True)
class Due:
    """A delivery to attempt now: everything the relay needs, read in one query."""

    event_id: str
    route_id: str
    target: str
    origin: str
    body: bytes
    content_type: str
    attempts: int


@dataclass(frozen=True, slots=True)
class Outbox:
    due: tuple[Due, ...]
    next_at: float | None  # the earliest pending attempt not returned in `due`
    depth: int  # pending deliveries
    oldest_queued_at: float | None


@dataclass(frozen=True, slots=True)
class Listing:
    id: str
    environment: str
    prediction_id: str | None
    event: str | None
    target: str
    status: Status
    attempts: int
    received_at: float
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Receipt:
    outcome: Literal["stored", "duplicate", "unknown_route"]
    route: Route | None = None
    event_id: str | None = None  # the webhook-id, for a newly stored event


def new_route_id() -> str:
    return secrets.token_urlsafe(24)  # 192 bits: a route id is the only secret in its URL


def new_event_id() -> str:
    return "msg_" + secrets.token_hex(16)


class Store:
    """One SQLite connection; every method is one transaction, committed before it returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Event bodies are the user's predictions: the file is the owner's alone.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
            if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the webhook store {path}: {exc}") from None

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer skyproxy (schema {version})")
        if version < SCHEMA_VERSION:
            # IMMEDIATE: a deferred transaction that turns into a write while another process
            # commits fails at once in WAL mode instead of waiting for the busy timeout.
            self._db.executescript(
                "BEGIN IMMEDIATE;" + _SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};COMMIT;"
            )

    def close(self) -> None:
        self._db.close()

    def _write(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    # -- routes -------------------------------------------------------------------------------
    def add_route(self, route: Route) -> None:
        events = json.dumps(list(route.events)) if route.events is not None else "null"
        self._write(
            lambda db: db.execute(
                "INSERT INTO routes (id, environment, target, events, user_id, request_id, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    route.id,
                    route.environment,
                    route.target,
                    events,
                    route.user_id,
                    route.request_id,
                    route.created_at,
                ),
            )
        )

    def route(self, route_id: str) -> Route | None:
        row = self._db.execute(
            "SELECT id, environment, target, events, user_id, request_id, created_at, gone_at"
            " FROM routes WHERE id = ?",
            (route_id,),
        ).fetchone()
        if row is None:
            return None
        events = json.loads(row[3])
        return Route(
            id=row[0],
            environment=row[1],
            target=row[2],
            events=tuple(events) if events is not None else None,
            user_id=row[4],
            request_id=row[5],
            created_at=row[6],
            gone=row[7] is not None,
        )

    # -- receiving ----------------------------------------------------------------------------
    def receive(
        self,
        environment: str,
        route_id: str,
        body: bytes,
        content_type: str,
        prediction_id: str | None,
        event: str | None,
        now: float,
    ) -> Receipt:
        """Stores a verified event and queues its delivery, unless it is a duplicate."""

        def work(db: sqlite3.Connection) -> Receipt:
            route = self.route(route_id)
            if route is None or route.environment != environment:
                return Receipt("unknown_route")
            digest = hashlib.sha256(body).hexdigest()
            event_id = new_event_id()
            inserted = db.execute(
                "INSERT OR IGNORE INTO events (id, route_id, body_sha256, body, content_type,"
                " prediction_id, event, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (event_id, route_id, digest, body, content_type, prediction_id, event, now),
            ).rowcount
            if not inserted:
                return Receipt("duplicate", route)
            status = "gone" if route.gone else "pending"
            db.execute(
                "INSERT INTO deliveries (event_id, origin, status, next_attempt_at, queued_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (event_id, targets.origin_of(route.target), status, now, now),
            )
            return Receipt("stored", route, event_id)

        result: Receipt = self._write(work)
        return result

    # -- the outbox ---------------------------------------------------------------------------
    def outbox(
        self, now: float, skip_events: Sequence[str], skip_origins: Sequence[str], limit: int
    ) -> Outbox:
        """Pending deliveries due now, except those in flight or to origins at their cap."""
        skip_e = ",".join("?" * len(skip_events))
        skip_o = ",".join("?" * len(skip_origins))
        where = "d.status = 'pending'"
        if skip_events:
            where += f" AND d.event_id NOT IN ({skip_e})"
        if skip_origins:
            where += f" AND d.origin NOT IN ({skip_o})"
        params = [*skip_events, *skip_origins]
        rows = self._db.execute(
            "SELECT d.event_id, e.route_id, r.target, d.origin, e.body, e.content_type, d.attempts"
            " FROM deliveries d JOIN events e ON e.id = d.event_id JOIN routes r ON r.id = e.route_id"
            f" WHERE {where} AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at LIMIT ?",
            (*params, now, max(limit, 0)),
        ).fetchall()
        due = tuple(Due(*row) for row in rows)
        taken = [d.event_id for d in due]
        later = self._db.execute(
            f"SELECT min(d.next_attempt_at) FROM deliveries d WHERE {where}"
            + (f" AND d.event_id NOT IN ({','.join('?' * len(taken))})" if taken else ""),
            (*params, *taken),
        ).fetchone()[0]
        depth, oldest = self._db.execute(
            "SELECT count(*), min(queued_at) FROM deliveries WHERE status = 'pending'"
        ).fetchone()
        return Outbox(due, later, depth, oldest)

    def delivered(self, event_id: str, attempts: int) -> None:
        self._finish(event_id, "delivered", attempts, None)

    def dead(self, event_id: str, attempts: int, error: str) -> None:
        self._finish(event_id, "dead", attempts, error)

    def retry(self, event_id: str, attempts: int, next_at: float, error: str) -> None:
        self._write(
            lambda db: db.execute(
                "UPDATE deliveries SET attempts = ?, next_attempt_at = ?, last_error = ?"
                " WHERE event_id = ? AND status = 'pending'",
                (attempts, next_at, error, event_id),
            )
        )

    def gone(self, route_id: str, event_id: str, attempts: int, error: str, now: float) -> int:
        """Marks the route gone and every pending delivery to it; returns how many."""

        def work(db: sqlite3.Connection) -> int:
            db.execute("UPDATE routes SET gone_at = ? WHERE id = ? AND gone_at IS NULL", (now, route_id))
            db.execute("UPDATE deliveries SET attempts = ? WHERE event_id = ?", (attempts, event_id))
            changed: int = db.execute(
                "UPDATE deliveries SET status = 'gone', last_error = ? WHERE status = 'pending'"
                " AND event_id IN (SELECT id FROM events WHERE route_id = ?)",
                (error, route_id),
            ).rowcount
            return changed

        result: int = self._write(work)
        return result

    def _finish(self, event_id: str, status: Status, attempts: int, error: str | None) -> None:
        self._write(
            lambda db: db.execute(
                "UPDATE deliveries SET status = ?, attempts = ?, last_error = ?"
                " WHERE event_id = ? AND status = 'pending'",
                (status, attempts, error, event_id),
            )
        )

    def replay(self, event_id: str, now: float) -> Status:
        """Queues a delivered or dead event again, same webhook-id; returns its old status."""

        def work(db: sqlite3.Connection) -> Status:
            row = db.execute("SELECT status FROM deliveries WHERE event_id = ?", (event_id,)).fetchone()
            if row is None:
                raise StoreError(f"no webhook event {event_id!r}")
            status: Status = row[0]
            if status not in ("delivered", "dead"):
                reason = "it is still pending" if status == "pending" else "its target answered 410 Gone"
                raise StoreError(f"webhook event {event_id} cannot be replayed: {reason}")
            db.execute(
                "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?,"
                " queued_at = ?, last_error = NULL WHERE event_id = ?",
                (now, now, event_id),
            )
            return status

        result: Status = self._write(work)
        return result

    def listing(self, status: Status | None = None, limit: int = 1000) -> list[Listing]:
        query = (
            "SELECT e.id, r.environment, e.prediction_id, e.event, r.target, d.status, d.attempts,"
            " e.received_at, d.last_error FROM events e JOIN routes r ON r.id = e.route_id"
            " JOIN deliveries d ON d.event_id = e.id"
        )
        params: tuple[object, ...] = ()
        if status is not None:
            query += " WHERE d.status = ?"
            params = (status,)
        rows = self._db.execute(query + " ORDER BY e.received_at DESC LIMIT ?", (*params, limit))
        return [Listing(*row) for row in rows.fetchall()]

    # -- small named values -------------------------------------------------------------------
    def meta(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, name: str, value: str) -> None:
        self._write(
            lambda db: db.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )
        )


P = ParamSpec("P")
T = TypeVar("T")


class StoreThread:
    """The daemon's store: every call runs on one thread of its own, off the event loop."""

    def __init__(self, store: Store, thread: ThreadPoolExecutor) -> None:
        self.store = store
        self._thread = thread

    @classmethod
    async def open(cls, path: Path) -> StoreThread:
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skyproxy-webhooks")
        try:
            store = await asyncio.get_running_loop().run_in_executor(thread, Store, path)
        except BaseException:
            thread.shutdown(wait=False)
            raise
        return cls(store, thread)

    async def run(self, method: Callable[Concatenate[Store, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, lambda: method(self.store, *args, **kwargs))

    async def close(self) -> None:
        await self.run(Store.close)
        self._thread.shutdown(wait=True)
