"""The client: one pool per origin, connecting, the retry rule, and the client's own clocks.

A request is written in one call and its answer parsed by llhttp; an answer that arrives
in one read is whole before the waiting task resumes. Not supported, on purpose:
HTTP/2, proxies, redirects, upgrades.
"""

from __future__ import annotations

import asyncio
import ssl

from skyproxy.http1.connection import CLOSED, Connection
from skyproxy.http1.dns import Resolver
from skyproxy.http1.errors import ConnectFailed, ConnectTimeout, Disconnected, UpstreamError
from skyproxy.http1.origin import Origin
from skyproxy.http1.pool import Pool
from skyproxy.http1.request import Body, replayable
from skyproxy.http1.response import Response
from skyproxy.http1.settings import Limits, Timeouts

_MIN_TICK = 0.01


class Client:
    """Keep-alive connections per origin, for one environment's whole life.

    `timeouts` may be replaced while the client runs (a reload does); `limits` is fixed.
    """

    def __init__(
        self, timeouts: Timeouts | None = None, limits: Limits | None = None, resolver: Resolver | None = None
    ) -> None:
        self.timeouts = timeouts or Timeouts()
        self.limits = limits or Limits()
        self._resolver = resolver or Resolver()
        self._pools: dict[Origin, Pool] = {}
        self._tls: ssl.SSLContext | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._closing = False
        self.opened_total = 0  # connections ever opened: against requests, how well reuse works

    async def request(
        self,
        method: str,
        origin: Origin,
        target: str,
        head: bytes | bytearray,
        body: Body,
        length: int | None = None,
    ) -> Response:
        """Sends a request and waits for its answer's status and headers.

        `head` holds the header lines, each ending in CRLF, without Host or framing;
        `length` is a streamed body's length when known (else it is sent chunked).
        Release the answer: `async with await client.request(...) as response:`.
        """
        if self._closing:
            raise UpstreamError("the upstream client is closed")
        pool = self._pools.get(origin) or self._add_pool(origin)
        if self._tick is None:
            self._schedule()
        while True:
            conn = pool.take(asyncio.get_running_loop().time())
            reused = conn is not None
            if conn is None:
                conn, reused = await self._acquire(pool)
            if conn.state is CLOSED:  # closed by the upstream before a byte was sent
                if reused:
                    continue
                raise Disconnected("upstream closed the connection before answering")
            answer = conn.begin(method, target, head, body, length)
            try:
                await answer.head()
            except Disconnected:
                conn.release()
                # A kept-alive connection the server closed just as we used it: try the
                # next one, but only where sending twice cannot do anything twice. A
                # fresh connection is never retried, so this ends.
                if reused and replayable(method, body):
                    continue
                raise
            except BaseException:
                conn.release()
                raise
            return Response(answer, conn)

    async def _acquire(self, pool: Pool) -> tuple[Connection, bool]:
        """A connection once none was idle: a new one if there is room, else the next
        one released or closed, waiting at most the pool timeout. True if reused."""
        if not pool.reserve():
            given = await pool.wait(self.timeouts.pool)
            if given is not None:
                return given, True
        try:
            conn = await self._connect(pool)
        except BaseException:
            pool.unreserve()
            raise
        pool.opened(conn)
        self.opened_total += 1
        return conn, False

    async def _connect(self, pool: Pool) -> Connection:
        timeout = self.timeouts.connect
        try:
            return await asyncio.wait_for(self._dial(pool), timeout)
        except asyncio.TimeoutError:
            raise ConnectTimeout(f"upstream connect timed out after {timeout:g} s") from None

    async def _dial(self, pool: Pool) -> Connection:
        """Tries the origin's addresses in the order the resolver gives them."""
        origin = pool.origin
        try:
            addresses = await self._resolver.resolve(origin.host, origin.port)
        except OSError as exc:
            raise ConnectFailed(f"cannot resolve the upstream host: {type(exc).__name__}") from None
        tls = self._tls_context() if origin.tls else None
        loop = asyncio.get_running_loop()
        failure: OSError | None = None
        for family, host, port in addresses:
            try:
                transport, conn = await loop.create_connection(
                    lambda: Connection(pool),
                    host,
                    port,
                    family=family,
                    ssl=tls,
                    # The certificate is checked against the name, not the address.
                    server_hostname=origin.host if tls else None,
                )
            except OSError as exc:
                failure = exc
                continue
            if conn.transport is None:  # uvloop may run connection_made after returning
                conn.connection_made(transport)
            return conn
        self._resolver.forget(origin.host, origin.port)
        raise ConnectFailed(f"cannot connect: {type(failure).__name__}")

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()  # the system's trust store
        return self._tls

    def _add_pool(self, origin: Origin) -> Pool:
        pool = self._pools[origin] = Pool(origin, self.limits)
        return pool

    # -- the clocks: idle expiry, read and write timeouts ----------------------------------
    def _schedule(self) -> None:
        timeouts = self.timeouts
        # Coarse on purpose: a tick looks at every connection, so no timer is set per
        # request; a timeout fires between its value and a quarter more.
        tick = max(min(self.limits.keepalive, timeouts.read, timeouts.write) / 4, _MIN_TICK)
        self._tick = asyncio.get_running_loop().call_later(tick, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        now = asyncio.get_running_loop().time()
        timeouts = self.timeouts
        for pool in self._pools.values():
            pool.expire(now)
            for conn in list(pool.busy):
                conn.check_timeouts(now, timeouts)
        if not self._closing and any(pool.busy or pool.idle or pool.opening for pool in self._pools.values()):
            self._schedule()

    # -- what the metrics read ----------------------------------------------------------
    @property
    def connections(self) -> int:
        return sum(len(pool.busy) + len(pool.idle) for pool in self._pools.values())

    @property
    def idle(self) -> int:
        return sum(len(pool.idle) for pool in self._pools.values())

    async def close(self) -> None:
        self._closing = True
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for pool in self._pools.values():
            pool.close()
        await asyncio.sleep(0)  # let the transports run connection_lost
