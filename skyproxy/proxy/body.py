"""The client's request body: the expectation it may send, its size limit, what the audit keeps.

Every 413 and every answer to `Expect` is decided here. A body is refused from its
declared length before a byte of it is read, or, when its length is not declared, as
soon as it crosses the limit while it streams on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.http import HttpVersion11

from skyproxy.proxy.deadlines import Deadline, Phase
from skyproxy.proxy.exchange import CAPTURE_LIMIT, SMALL_BODY, Failure, Outcome, Route

Body = bytes | AsyncIterator[bytes] | None
Upload = tuple[Body, int | None]

EXPECTATION_FAILED = Failure(417, "expectation_failed", "Only the expectation 100-continue is understood.")


class BodyTooLarge(Exception):
    """The client's body crossed max_body_bytes while it streamed."""


def too_large(limit: int) -> Failure:
    # The unread rest of the body is still on the connection: it must not be parsed as
    # the next request.
    return Failure(413, "body_too_large", f"Request body exceeds {limit} bytes.", close=True)


def refusal(request: web.BaseRequest, limit: int) -> Failure | None:
    """A request answered without reading its body: an expectation other than 100-continue,
    or a declared length over the limit. None when the body may be read."""
    expect = request.headers.get("Expect")
    if expect is not None and expect.lower() != "100-continue":
        return EXPECTATION_FAILED
    length = request.content_length
    if length is not None and length > limit:
        return too_large(limit)
    return None


async def read_whole(request: web.BaseRequest) -> bytes | None:
    """A body of known, small length, read now (after a 100-continue); None for any other.

    For admission steps that must see the body before the exchange, such as pricing a create.
    """
    if request.content.is_eof():
        return buffered(request)
    length = request.content_length
    if not request.body_exists or length is None or length > SMALL_BODY:
        return None
    if request.version == HttpVersion11 and "Expect" in request.headers:
        await _continue(request)
    return await request.read()


def buffered(request: web.BaseRequest) -> bytes | None:
    """`read_whole()` for a body that has come in whole already (`request.content.is_eof()`),
    taken without waiting: with it in, a client waiting to be told to send has nothing to wait for."""
    length = request.content_length
    if not request.body_exists or length is None or length > SMALL_BODY:
        return None
    return request.content.read_nowait()


async def upload(request: web.BaseRequest, route: Route, outcome: Outcome, deadline: Deadline) -> Upload:
    """The body to send on, and its length when it streams with a known one.

    Called once the request is admitted, under `deadline` in its upload phase. A small body
    is read whole within one `idle_timeout`; a larger one streams, counted against the
    body limit as it goes (`BodyTooLarge`), each piece moving the deadline on. The audit's
    share of it goes to `outcome.request_prefix` when that is being kept."""
    if not request.body_exists:
        return None, None
    if request.version == HttpVersion11 and "Expect" in request.headers:
        await _continue(request)
    length = request.content_length
    if length is not None and length <= SMALL_BODY:
        content = request.content
        body = content.read_nowait() if content.is_eof() else await request.read()
        if outcome.request_prefix is not None:
            outcome.request_prefix = body
        return body, None
    return _limited(request.content, route, outcome.request_prefix, deadline), length


async def _continue(request: web.BaseRequest) -> None:
    """Tells a client waiting with `Expect: 100-continue` (the only one admitted) to send its body.

    Only now, once the request is admitted: a refused client never uploads. Then the
    writer's output size goes back to 0, exactly as aiohttp's own
    `_default_expect_handler` does: the interim answer is not the start of the answer
    proper, and aiohttp will not send an error answer once that has started.
    """
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0


async def _limited(
    content: aiohttp.StreamReader, route: Route, prefix: bytes | bytearray | None, deadline: Deadline
) -> AsyncIterator[bytes]:
    """The body as it streams, counted; `prefix`, the outcome's bytearray, grows in place.

    The upstream client pulls the next piece once it has written the last, so while the
    generator waits at its `yield` it waits for the upstream (SEND), and while it waits
    for a piece it waits for the client (UPLOAD). An answer that comes early, during the
    upload, has moved the deadline to a later phase: that is left alone."""
    limit = route.max_body_bytes
    idle = route.idle_timeout
    total = 0
    async for chunk in content.iter_any():
        deadline.extend(idle)
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge
        if prefix is not None and len(prefix) < CAPTURE_LIMIT:
            prefix += chunk[: CAPTURE_LIMIT - len(prefix)]
        if deadline.phase is Phase.UPLOAD:
            deadline.phase = Phase.SEND
        yield chunk
        if deadline.phase is Phase.SEND:
            deadline.phase = Phase.UPLOAD
    if deadline.phase is Phase.UPLOAD:  # not when the answer came early, during the upload
        deadline.enter(Phase.HEAD, route.head_timeout)
