"""Host, Origin and network checks against browsers, DNS rebinding and foreign networks.

Any web page the developer opens can reach a proxy on localhost. A cross-origin page
carries an Origin (or Sec-Fetch-Site) header; a DNS-rebinding page carries a foreign
Host. Both are refused before a key is ever attached.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache
from typing import NamedTuple

from multidict import CIMultiDictProxy

from skyproxy.config import LOOPBACK_NAMES, IPNetwork, ServerSettings


class Refusal(NamedTuple):
    status: int
    code: str
    message: str


HOST_NOT_ALLOWED = "host_not_allowed"
ORIGIN_NOT_ALLOWED = "origin_not_allowed"
NETWORK_NOT_ALLOWED = "network_not_allowed"
ADMIN_NOT_ALLOWED = "admin_not_allowed"


class Guard:
    __slots__ = ("_hosts", "_networks", "_origins")

    def __init__(self, server: ServerSettings, listen_hosts: Iterable[str]) -> None:
        hosts = set(LOOPBACK_NAMES) | set(server.allowed_hosts)
        hosts.update(h.lower() for h in listen_hosts if h not in ("0.0.0.0", "::"))
        self._hosts = frozenset(hosts)
        self._origins = server.allowed_origins
        self._networks = server.allowed_networks

    def check(self, headers: CIMultiDictProxy[str], remote: str | None) -> Refusal | None:
        """The refusal for a request, or None when it may proceed."""
        if not _remote_allowed(remote, self._networks):
            return Refusal(403, NETWORK_NOT_ALLOWED, "Your network may not use this proxy.")
        host = _host_name(headers.get("Host", ""))
        if host not in self._hosts:
            return Refusal(
                403,
                HOST_NOT_ALLOWED,
                "Host not allowed; add it to [server] allowed_hosts if it is yours.",
            )
        origin = headers.get("Origin")
        if origin is not None:
            if origin.lower() not in self._origins:
                return Refusal(
                    403,
                    ORIGIN_NOT_ALLOWED,
                    "Browser origin not allowed; add it to [server] allowed_origins if it is yours.",
                )
        elif headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
            # A browser request from another site that carries no Origin (a navigation or an
            # <img>): never ours to serve.
            return Refusal(403, ORIGIN_NOT_ALLOWED, "Cross-site browser requests are refused.")
        return None

    def allowed_origin(self, headers: CIMultiDictProxy[str]) -> str | None:
        """The request's Origin when it is one we allow, for CORS response headers."""
        origin = headers.get("Origin")
        return origin if origin is not None and origin.lower() in self._origins else None


def is_loopback(remote: str | None) -> bool:
    return remote is not None and _is_loopback(remote)


@lru_cache(maxsize=4096)
def _address(remote: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's address, an IPv4-mapped IPv6 one (::ffff:a.b.c.d) as the IPv4 it is."""
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


@lru_cache(maxsize=4096)
def _is_loopback(remote: str) -> bool:
    # Cached as `_address` is: ipaddress's `is_loopback` is a network membership test in
    # Python, a few thousand instructions on every request from the same few peers.
    address = _address(remote)
    return address is not None and address.is_loopback


def _remote_allowed(remote: str | None, networks: tuple[IPNetwork, ...]) -> bool:
    if remote is None:
        return False
    if _is_loopback(remote):
        return True
    return bool(networks) and _in_networks(remote, networks)


@lru_cache(maxsize=4096)
def _in_networks(remote: str, networks: tuple[IPNetwork, ...]) -> bool:
    address = _address(remote)
    return address is not None and any(address in network for network in networks)


@lru_cache(maxsize=1024)
def _host_name(host: str) -> str:
    """The name part of a Host header: no port, no brackets, lower case, no trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    name, _, port = host.rpartition(":")
    if name and port.isdigit():
        host = name
    return host.rstrip(".")
