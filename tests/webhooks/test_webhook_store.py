"""The durable store: real SQLite files, and a real SIGKILL right after a commit returns."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers.webhooks import add_route

from skyproxy.webhooks.store import Route, Store, StoreError, new_route_id

NOW = 1_800_000_000.0
TARGET = "http://127.0.0.1:9/hooks"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    opened = Store(tmp_path / "state" / "webhooks.sqlite3")
    yield opened  # type: ignore[misc]
    opened.close()


def route(store: Store, target: str = TARGET, environment: str = "dev") -> str:
    route_id = new_route_id()
    store.add_route(Route(route_id, environment, target, None, "alice", "r1", NOW))
    return route_id


def receive(store: Store, route_id: str, body: bytes = b'{"id":"p1"}', environment: str = "dev"):  # type: ignore[no-untyped-def]
    return store.receive(environment, route_id, body, "application/json", "p1", "completed", NOW)


def test_the_file_and_its_folder_are_created_for_the_owner_only(store: Store) -> None:
    assert store.path.exists()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
    sync = store._db.execute("PRAGMA synchronous").fetchone()[0]
    assert (mode, sync) == ("wal", 2)  # 2 is FULL: the log is fsynced at every commit


def test_route_ids_have_at_least_128_bits() -> None:
    ids = {new_route_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) * 6 >= 128 for i in ids)


def test_the_same_body_on_a_route_is_one_event(store: Store) -> None:
    r = route(store)
    first = receive(store, r)
    assert first.outcome == "stored" and first.event_id and first.event_id.startswith("msg_")
    assert receive(store, r).outcome == "duplicate"
    assert receive(store, r, b'{"id":"p1","status":"succeeded"}').outcome == "stored"
    other = route(store)
    assert receive(store, other).outcome == "stored"  # the same body on another route is new
    assert len(store.listing()) == 3


def test_an_unknown_route_or_another_environment_stores_nothing(store: Store) -> None:
    r = route(store, environment="prod")
    assert receive(store, "x" * 32).outcome == "unknown_route"
    assert receive(store, r, environment="dev").outcome == "unknown_route"
    assert store.listing() == []


def test_the_outbox_skips_in_flight_events_and_full_origins(store: Store) -> None:
    a = route(store, "http://127.0.0.1:1/a")
    b = route(store, "http://127.0.0.1:2/b")
    ea = receive(store, a).event_id
    eb = receive(store, b).event_id
    outbox = store.outbox(NOW, (), (), 10)
    assert {d.event_id for d in outbox.due} == {ea, eb}
    assert (outbox.depth, outbox.oldest_queued_at, outbox.next_at) == (2, NOW, None)
    assert [d.event_id for d in store.outbox(NOW, (ea,), (), 10).due] == [eb]
    assert [d.event_id for d in store.outbox(NOW, (), ("http://127.0.0.1:2",), 10).due] == [ea]
    limited = store.outbox(NOW, (), (), 1)
    assert len(limited.due) == 1 and limited.next_at == NOW


def test_retry_then_delivered_and_replay(store: Store) -> None:
    r = route(store)
    event = receive(store, r).event_id
    assert event is not None
    store.retry(event, 1, NOW + 30, "HTTP 500")
    assert store.outbox(NOW, (), (), 10).due == ()
    assert store.outbox(NOW, (), (), 10).next_at == NOW + 30
    with pytest.raises(StoreError, match="still pending"):
        store.replay(event, NOW)
    store.delivered(event, 2)
    [listed] = store.listing()
    assert (listed.status, listed.attempts, listed.last_error) == ("delivered", 2, None)
    assert store.replay(event, NOW + 60) == "delivered"
    [again] = store.outbox(NOW + 60, (), (), 10).due
    assert (again.event_id, again.attempts) == (event, 0)  # the same webhook-id, a fresh schedule
    with pytest.raises(StoreError, match="no webhook event"):
        store.replay("msg_nope", NOW)


def test_gone_marks_the_route_and_its_pending_deliveries(store: Store) -> None:
    r = route(store)
    first = receive(store, r, b"1").event_id
    receive(store, r, b"2")
    other = receive(store, route(store), b"3").event_id
    assert first is not None
    assert store.gone(r, first, 1, "HTTP 410", NOW) == 2
    assert {x.id: x.status for x in store.listing()} == {
        first: "gone",
        **{x.id: "gone" for x in store.listing() if x.id not in (first, other)},
        other: "pending",
    }
    assert receive(store, r, b"4").outcome == "stored"
    assert store.listing("gone")[0].status == "gone"
    assert len(store.listing("gone")) == 3  # an event after the 410 is kept, never sent
    with pytest.raises(StoreError, match="410"):
        store.replay(first, NOW)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.sqlite3"
    Store(path).close()
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(StoreError, match="newer skyproxy"):
        Store(path)


def test_an_unopenable_store_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot open the webhook store"):
        Store(tmp_path / "file" / "w.sqlite3")


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from skyproxy.webhooks.store import Store
    store = Store(Path(sys.argv[1]))
    n = 0
    while True:
        receipt = store.receive("dev", sys.argv[2], b"event %d" % n, "text/plain", None, None, time.time())
        print(receipt.event_id, flush=True)  # only after the commit returned
        n += 1
    """
)


def test_every_commit_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "w.sqlite3"
    route_id = add_route(path, TARGET)
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), route_id], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    acknowledged = []
    deadline = time.monotonic() + 30
    while len(acknowledged) < 50 and time.monotonic() < deadline:
        acknowledged.append(child.stdout.readline().strip())
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    reopened = Store(path)
    try:
        kept = {x.id: x.status for x in reopened.listing(limit=100_000)}
    finally:
        reopened.close()
    assert len(acknowledged) == 50
    assert all(kept.get(event_id) == "pending" for event_id in acknowledged)
