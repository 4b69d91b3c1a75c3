"""The notify protocol against real AF_UNIX datagram sockets, as PID 1 has them."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from skyproxy.daemon.notify import Notifier, watchdog_interval


class Receiver:
    """The service manager's end: a bound datagram socket we read from."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)

    @property
    def notify_socket(self) -> str:
        """The address spelled as systemd puts it in $NOTIFY_SOCKET."""
        if self.address.startswith("\0"):
            return "@" + self.address[1:]
        return self.address

    def recv(self, timeout: float = 2.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096)

    def assert_silent(self) -> None:
        with pytest.raises(TimeoutError):
            self.recv(timeout=0.2)


@pytest.fixture
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    # tmp_path_factory keeps the path short: sun_path holds only 108 bytes.
    path = tmp_path_factory.mktemp("ns") / "notify"
    r = Receiver(str(path))
    yield r
    r.sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    r = Receiver(f"\0skyproxy-test/{uuid.uuid4().hex}")
    yield r
    r.sock.close()


@pytest.fixture
def notifier(receiver: Receiver) -> Iterator[Notifier]:
    n = Notifier.from_environ({"NOTIFY_SOCKET": receiver.notify_socket})
    assert n is not None
    yield n
    n.close()


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}], ids=["unset", "empty"])
def test_from_environ_without_notify_socket_is_none(environ: dict[str, str]) -> None:
    assert Notifier.from_environ(environ) is None


@pytest.mark.parametrize("value", ["relative/notify", "@", "vsock:2:1234"])
def test_from_environ_ignores_unsupported_addresses(value: str) -> None:
    assert Notifier.from_environ({"NOTIFY_SOCKET": value}) is None


def test_from_environ_reads_os_environ_by_default(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.notify_socket)
    n = Notifier.from_environ()
    assert n is not None
    with n:
        n.ready()
    assert receiver.recv() == b"READY=1"


def test_ready(notifier: Notifier, receiver: Receiver) -> None:
    notifier.ready()
    assert receiver.recv() == b"READY=1"


def test_ready_with_status(notifier: Notifier, receiver: Receiver) -> None:
    notifier.ready("listening on 127.0.0.1:8787")
    assert receiver.recv() == b"READY=1\nSTATUS=listening on 127.0.0.1:8787"


def test_reloading_carries_monotonic_usec(notifier: Notifier, receiver: Receiver) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", receiver.recv())
    assert match is not None
    assert before <= int(match[1]) <= after


def test_stopping(notifier: Notifier, receiver: Receiver) -> None:
    notifier.stopping()
    assert receiver.recv() == b"STOPPING=1"


def test_watchdog(notifier: Notifier, receiver: Receiver) -> None:
    notifier.watchdog()
    assert receiver.recv() == b"WATCHDOG=1"


def test_status(notifier: Notifier, receiver: Receiver) -> None:
    notifier.status("reloaded config generation 3")
    assert receiver.recv() == b"STATUS=reloaded config generation 3"


def test_status_cannot_smuggle_fields(notifier: Notifier, receiver: Receiver) -> None:
    notifier.status("bad config\nREADY=1")
    assert receiver.recv() == b"STATUS=bad config READY=1"


def test_status_is_utf8(notifier: Notifier, receiver: Receiver) -> None:
    notifier.status("clé refusée")
    assert receiver.recv() == "STATUS=clé refusée".encode()


def test_abstract_namespace(abstract_receiver: Receiver) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": abstract_receiver.notify_socket})
    assert n is not None
    assert n.address == abstract_receiver.notify_socket
    with n:
        n.ready("up")
        n.stopping()
    assert abstract_receiver.recv() == b"READY=1\nSTATUS=up"
    assert abstract_receiver.recv() == b"STOPPING=1"


def test_missing_socket_is_swallowed_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="skyproxy.notify")
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n is not None
    with n:
        n.ready()
        assert n.send("WATCHDOG=1") is False
    assert any(r.levelno == logging.DEBUG and "READY=1" in r.getMessage() for r in caplog.records)


def test_full_queue_does_not_block(notifier: Notifier, receiver: Receiver) -> None:
    # PID 1 stuck (or this socket never read) fills the kernel queue after a
    # few datagrams; a blocking send would then freeze the event loop forever.
    results: list[bool] = []

    def flood() -> None:
        results.extend(notifier.send("WATCHDOG=1") for _ in range(2000))

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "send blocked on a full receive queue"
    assert results[0] is True
    assert False in results
    assert receiver.recv() == b"WATCHDOG=1"


def test_close_stops_sending(notifier: Notifier, receiver: Receiver) -> None:
    notifier.close()
    notifier.close()
    notifier.ready()
    assert notifier.send("READY=1") is False
    receiver.assert_silent()


def test_sends_from_this_process(notifier: Notifier, receiver: Receiver) -> None:
    # With NotifyAccess=main systemd drops datagrams whose sender is not the
    # main PID; it learns the sender from SCM_CREDENTIALS, checked here.
    receiver.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    notifier.ready()
    receiver.sock.settimeout(2)
    msg, ancdata, _flags, _addr = receiver.sock.recvmsg(4096, socket.CMSG_SPACE(12))
    assert msg == b"READY=1"
    creds = [d for lvl, typ, d in ancdata if (lvl, typ) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)]
    assert len(creds) == 1
    assert int.from_bytes(creds[0][:4], "little") == os.getpid()


SECOND = 1_000_000


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-30000000"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": str(30 * SECOND)}, 15.0),
        ({"WATCHDOG_USEC": "3"}, 0.0000015),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ) == expected


def test_watchdog_interval_for_this_pid() -> None:
    environ = {"WATCHDOG_USEC": str(30 * SECOND), "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(environ) == 15.0


@pytest.mark.parametrize("pid", [str(os.getpid() + 1), "1", "", "self"])
def test_watchdog_interval_for_another_pid(pid: str) -> None:
    environ = {"WATCHDOG_USEC": str(30 * SECOND), "WATCHDOG_PID": pid}
    assert watchdog_interval(environ) is None


def test_watchdog_interval_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", str(20 * SECOND))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 10.0
