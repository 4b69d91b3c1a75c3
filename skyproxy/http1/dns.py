"""A small DNS cache: each name's addresses are reused for a TTL, one lookup at a time.

Lookups go through the loop's getaddrinfo (a thread, so the loop never blocks). Names
that are already addresses skip it. The addresses are returned in the order the system
resolver ranks them; the client tries them in that order.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from skyproxy.http1.settings import DNS_TTL

Address = tuple[int, str, int]  # family, host, port


class Resolver:
    __slots__ = ("_cache", "_pending", "ttl")

    def __init__(self, ttl: float = DNS_TTL) -> None:
        self.ttl = ttl
        self._cache: dict[tuple[str, int], tuple[float, list[Address]]] = {}
        self._pending: dict[tuple[str, int], asyncio.Future[list[Address]]] = {}

    async def resolve(self, host: str, port: int) -> list[Address]:
        """The addresses for `host`, best first. Raises OSError when there are none."""
        literal = _literal(host, port)
        if literal is not None:
            return literal
        loop = asyncio.get_running_loop()
        key = (host, port)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > loop.time():
            return cached[1]
        pending = self._pending.get(key)
        if pending is None:
            # Shared by every connect that needs the name meanwhile; shielded, so one
            # caller's cancellation does not fail the others' lookup.
            pending = self._pending[key] = asyncio.ensure_future(self._lookup(host, port))
            pending.add_done_callback(lambda done: self._settled(key, done))
        return await asyncio.shield(pending)

    def forget(self, host: str, port: int) -> None:
        """Drops a name whose addresses all failed, so the next connect asks again."""
        self._cache.pop((host, port), None)

    async def _lookup(self, host: str, port: int) -> list[Address]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses: list[Address] = []
        for family, _, _, _, sockaddr in infos:
            address = (int(family), str(sockaddr[0]), int(sockaddr[1]))
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise OSError(f"no addresses for {host}")
        return addresses

    def _settled(self, key: tuple[str, int], done: asyncio.Future[list[Address]]) -> None:
        del self._pending[key]
        if done.cancelled() or done.exception() is not None:
            return  # retrieved, so a lookup nobody waits for any more logs nothing
        self._cache[key] = (asyncio.get_running_loop().time() + self.ttl, done.result())


def _literal(host: str, port: int) -> list[Address] | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, host, port)]
