"""A TCP relay in front of a server that can hold back its replies: a slow network, on demand.

Requests always reach the server, so a command sent while replies are held runs there
although its caller times out: the case where a script's effect exists but its answer
never arrived.
"""

from __future__ import annotations

import asyncio
import contextlib


class SlowRelay:
    """Relays 127.0.0.1:`port` to 127.0.0.1:`target`; replies wait while `hold` is set."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.hold = asyncio.Event()  # set: replies are held back
        self.hold_only: bytes | None = None  # then only from the first that holds these bytes
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
        for pump in (self._pump(client_r, server_w, False), self._pump(server_r, client_w, True)):
            task = asyncio.get_running_loop().create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool) -> None:
        try:
            while data := await reader.read(65_536):
                held = self.hold_only is None or self.hold_only in data
                while replies and held and self.hold.is_set():
                    await asyncio.sleep(0.01)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(ConnectionError, OSError):
                writer.close()
