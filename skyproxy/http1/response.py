"""The answer as the caller sees it: the head as received, the body as it arrives.

Use it with `async with`, or call `release()` when done: either way the connection goes
back to the pool only if the exchange left it clean, and is closed otherwise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING

from skyproxy.http1.answer import Answer, Headers

if TYPE_CHECKING:
    from skyproxy.http1.connection import Connection


class Response:
    __slots__ = (
        "_answer",
        "_connection",
        "content_encoding",
        "content_length",
        "content_type",
        "headers",
        "reason",
        "status",
        "version",
    )

    def __init__(self, answer: Answer, connection: Connection) -> None:
        self._answer = answer
        self._connection: Connection | None = connection
        self.status = answer.status
        self.reason = answer.reason  # bytes, exactly as sent
        self.version = answer.version  # "1.1" or "1.0"
        self.headers: Headers = answer.headers  # (name, value) bytes, in order, as sent
        self.content_length = answer.content_length
        self.content_type = answer.content_type  # the media type alone, lower case
        self.content_encoding = answer.content_encoding

    @property
    def trailers(self) -> Headers:
        """Fields sent after a chunked body, once the body is read. Never part of `headers`."""
        return self._answer.trailers or []

    async def read(self) -> bytes:
        """The whole body. Raises IncompleteBody if the upstream cut it short."""
        answer = self._answer
        while not answer.complete:
            await answer.wait()
        chunks = answer.take()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body in the pieces it arrives in; the upstream is paused while they wait.

        Raises IncompleteBody if the upstream cut the body short, after the pieces that
        did arrive.
        """
        answer = self._answer
        while True:
            chunks = answer.take()
            if chunks:
                for chunk in chunks:
                    yield chunk
            elif answer.complete:
                return
            else:
                await answer.wait()

    def release(self) -> None:
        """Done with the answer. Safe to call more than once: only the first counts, so a
        late second call can never release the connection's next exchange."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.release()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
