"""The systemd notify protocol (sd_notify(3)), spoken by hand.

The protocol is one AF_UNIX datagram of newline-separated ``KEY=VALUE`` fields
sent to the socket named by ``$NOTIFY_SOCKET``; it is small enough that a
dependency (or libsystemd through ctypes) would cost more than it saves.
Every failure is swallowed and logged at debug level: a daemon that cannot
tell systemd it is ready is still better off serving than crashing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from types import TracebackType

__all__ = ["Notifier", "watchdog_interval"]

log = logging.getLogger("skyproxy.notify")


class Notifier:
    """Sends state changes to the service manager that started this process."""

    __slots__ = ("_address", "_sock")

    def __init__(self, address: str) -> None:
        # A leading "@" is systemd's spelling of Linux's abstract namespace,
        # whose real first byte is NUL.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # A full receive queue in PID 1 must not stall the event loop.
        self._sock.setblocking(False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier | None:
        """A notifier for ``$NOTIFY_SOCKET``, or None outside a Type=notify unit."""
        address = environ.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        # Other schemes (vsock: in newer systemd) are for VMs and containers'
        # managers, never for a service unit; ignoring them beats guessing.
        if not address.startswith(("/", "@")) or len(address) < 2:
            log.debug("ignoring unsupported NOTIFY_SOCKET %r", address)
            return None
        try:
            return cls(address)
        except OSError as exc:
            log.debug("cannot create notify socket: %s", exc)
            return None

    @property
    def address(self) -> str:
        """The socket address as given, with "@" for the abstract namespace."""
        return "@" + self._address[1:] if self._address.startswith("\0") else self._address

    def send(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` fields; True if the kernel took it."""
        if self._sock is None:
            return False
        message = "\n".join(fields).encode("utf-8", "replace")
        try:
            self._sock.sendto(message, self._address)
        except OSError as exc:
            log.debug("notify %r to %s failed: %s", fields, self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        """Listeners are bound (or a reload finished); systemd may go on."""
        if status is None:
            self.send("READY=1")
        else:
            self.send("READY=1", _status_field(status))

    def reloading(self) -> None:
        """A reload began; the matching ready() ends it.

        systemd >= 253 (Type=notify-reload) only accepts RELOADING=1 whose
        MONOTONIC_USEC is not older than the SIGHUP it sent, so the stamp is
        taken here, as late as possible.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Shutdown began; systemd stops expecting watchdog pings."""
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        """The event loop is alive; resets systemd's WatchdogSec= timer."""
        self.send("WATCHDOG=1")

    def status(self, text: str) -> None:
        """Free text shown by ``systemctl status``."""
        self.send(_status_field(text))

    def close(self) -> None:
        """Release the socket; later sends are silently dropped."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else "open"
        return f"<Notifier {self.address!r} {state}>"


def _status_field(text: str) -> str:
    # A newline would end the field and let the rest be read as another
    # assignment (say READY=1 inside an error message).
    return "STATUS=" + " ".join(text.splitlines())


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between watchdog pings, or None when no watchdog is armed.

    Half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises, so one late
    ping is not fatal. ``$WATCHDOG_PID``, when set, must name this process:
    otherwise the variables were inherited from a parent that owns the watchdog.
    """
    usec = _parse_uint(environ.get("WATCHDOG_USEC", ""), "WATCHDOG_USEC")
    if not usec:
        return None
    if "WATCHDOG_PID" in environ:
        pid = _parse_uint(environ["WATCHDOG_PID"], "WATCHDOG_PID")
        if pid != os.getpid():
            return None
    return usec / 2 / 1_000_000


def _parse_uint(raw: str, name: str) -> int | None:
    # int() would also take signs, underscores, blanks and non-ASCII digits,
    # none of which systemd ever writes; such a value was not set by it.
    if raw.isascii() and raw.isdigit():
        return int(raw)
    if raw:
        log.debug("ignoring malformed %s=%r", name, raw)
    return None
