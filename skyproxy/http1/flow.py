"""Backpressure on one connection, both ways (after uvicorn's FlowControl).

Reading pauses while the answer's reader lags, so an upstream faster than the client
never fills memory. Writing waits while the kernel's send buffer is full, so an upload
never outruns an upstream that reads slowly.
"""

from __future__ import annotations

import asyncio


class FlowControl:
    __slots__ = ("_drained", "_transport", "closed", "read_paused")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._drained: asyncio.Future[None] | None = None
        self.read_paused = False
        self.closed = False

    @property
    def write_paused(self) -> bool:
        return self._drained is not None

    def pause_reading(self) -> None:
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.closed:
            self.read_paused = False
            self._transport.resume_reading()

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def drain(self) -> None:
        """Returns once the upstream may take more; raises once the connection is gone."""
        if self._drained is not None:
            await self._drained
        if self.closed:
            raise ConnectionResetError("upstream connection closed")

    def write(self, data: bytes | bytearray) -> None:
        if self.closed:
            raise ConnectionResetError("upstream connection closed")
        self._transport.write(data)

    def close(self) -> None:
        """The connection is gone: a writer waiting to drain wakes and sees it."""
        self.closed = True
        self.resume_writing()
