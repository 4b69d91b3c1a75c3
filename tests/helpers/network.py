"""This machine's own non-loopback address, for clients that must not look local."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import subprocess


def local_address() -> str | None:
    """A non-loopback IPv4 address of this machine: traffic to it never leaves the host."""
    found: set[str] = set()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=5)
        found.update(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out.stdout))
    with contextlib.suppress(OSError):
        found.update(str(i[4][0]) for i in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET))
    for address in sorted(found):
        if ipaddress.ip_address(address).is_loopback:
            continue
        with contextlib.suppress(OSError), socket.socket() as probe:
            probe.bind((address, 0))  # only an address of our own can be bound
            return address
    return None
