"""A raw upstream: an asyncio server whose script controls every byte it sends.

Each accepted connection runs the script with a Peer; the upstream counts connections,
records the requests it read and notes when the other side closed each connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from multidict import CIMultiDict

TIMEOUT = 10.0  # generous: only there so a broken client fails instead of hanging


@dataclass
class Seen:
    """A request as it reached the upstream, and on which connection (1, 2, ...)."""

    method: str
    target: str
    headers: CIMultiDict[str]
    body: bytes
    connection: int


class Peer:
    """One accepted upstream connection, as its script sees it."""

    def __init__(
        self, upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> None:
        self.upstream = upstream
        self.reader = reader
        self.writer = writer
        self.number = number

    async def request(self, *, body: bool = True) -> Seen | None:
        """The next request (its body too unless told not), or None once the client closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            self.upstream.eof[self.number].set()
            return None
        except ConnectionResetError:
            self.upstream.eof[self.number].set()
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.add(name.strip(), value.strip())
        data = await self._body(headers) if body else b""
        seen = Seen(method, target, headers, data, self.number)
        self.upstream.seen.append(seen)
        return seen

    async def _body(self, headers: CIMultiDict[str]) -> bytes:
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                out += await self.reader.readexactly(size)
                await self.reader.readline()
            await self.reader.readline()
            return bytes(out)
        return await self.reader.readexactly(int(headers.get("Content-Length", "0")))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_eof(self) -> None:
        """Reads and discards until the client closes its side of the connection."""
        with contextlib.suppress(ConnectionResetError):
            while await self.reader.read(65_536):
                pass
        self.upstream.eof[self.number].set()


Script = Callable[[Peer], Awaitable[None]]


class RawUpstream:
    """An asyncio server that runs `script` on every connection it accepts."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.url = ""
        self.connections = 0
        self.seen: list[Seen] = []
        self.eof: dict[int, asyncio.Event] = {}  # per connection: the client closed it
        self._tasks: set[asyncio.Task[object]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.eof[number] = asyncio.Event()
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                await self.script(Peer(self, reader, writer, number))
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stopped at teardown; asyncio's streams would log a task ended by cancelling
        finally:
            self._tasks.discard(task)

    async def wait_eof(self, connection: int) -> None:
        await asyncio.wait_for(self.eof[connection].wait(), TIMEOUT)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


def answer(status: int, body: bytes = b"", *headers: str) -> bytes:
    """A whole answer framed by Content-Length."""
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", *headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def echo(seen: Seen) -> bytes:
    """The answer keep_alive gives: which target, on which connection."""
    return answer(200, echo_body(seen.target, seen.connection), "Content-Type: application/json")


def echo_body(target: str, connection: int) -> bytes:
    return json.dumps({"path": target, "connection": connection}).encode()


async def keep_alive(peer: Peer) -> None:
    """A well-behaved upstream: answers every request on the connection until it closes."""
    while (seen := await peer.request()) is not None:
        await peer.send(echo(seen))


async def upload(total: int, piece: int = 65_536) -> AsyncIterator[bytes]:
    chunk = b"u" * piece
    for _ in range(total // piece):
        yield chunk


async def poll(condition: Callable[[], bool]) -> None:
    """Waits until `condition()` holds, failing after TIMEOUT."""

    async def wait() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), TIMEOUT)
