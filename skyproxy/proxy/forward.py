"""The upstream exchange: a keep-alive connection per request in flight, streaming both ways.

`forward()` sends the client's request on with the environment's key and streams the
answer back without buffering it. Connect failures map to 502 and timeouts to 504. An
upstream error body that echoes the key has it replaced by the fingerprint.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.http import HttpVersion11
from multidict import CIMultiDict

from skyproxy.config import ServerSettings
from skyproxy.http1.client import Client, ConnectTimeout, Origin, Response, UpstreamError
from skyproxy.proxy.deadlines import Deadline, Deadlines
from skyproxy.proxy.exchange import CAPTURE_LIMIT, SMALL_BODY, Failure, Outcome
from skyproxy.proxy.relay import relay


class BodyTooLarge(Exception):
    """The client's body crossed max_body_bytes while it streamed."""


async def _limited_body(content: aiohttp.StreamReader, limit: int, exchange: Outcome) -> AsyncIterator[bytes]:
    total = 0
    prefix = exchange.request_prefix
    async for chunk in content.iter_any():
        total += len(chunk)
        if total > limit:
            exchange.failure = Failure(413, "body_too_large", f"Request body exceeds {limit} bytes.")
            raise BodyTooLarge
        if prefix is not None and len(prefix) < CAPTURE_LIMIT:
            prefix += chunk[: CAPTURE_LIMIT - len(prefix)]
        yield chunk


async def _body(
    request: web.BaseRequest, server: ServerSettings, exchange: Outcome
) -> tuple[bytes | AsyncIterator[bytes] | None, int | None]:
    """The body to send, and its length when it streams with a known one."""
    if not request.body_exists:
        return None, None
    if request.version == HttpVersion11 and "Expect" in request.headers:
        # Only now, once the request is admitted: a refused client never uploads.
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not started
    length = request.content_length
    if length is not None and length <= SMALL_BODY:
        body = await request.read()
        if exchange.request_prefix is not None:
            exchange.request_prefix = body
        return body, None
    return _limited_body(request.content, server.max_body_bytes, exchange), length


async def forward(
    request: web.BaseRequest,
    client: Client,
    origin: Origin,
    head: bytearray,
    reply_headers: CIMultiDict[str],
    server: ServerSettings,
    key: str,
    fingerprint: str,
    exchange: Outcome,
    deadlines: Deadlines,
) -> web.StreamResponse | None:
    """Run the exchange. Returns the response sent, or None with `exchange.failure` set."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline: Deadline | None = None
    upstream: Response | None = None
    try:
        body, length = await _body(request, server, exchange)
        deadline = deadlines.arm(server.upstream_timeout)
        # The target goes on as the client encoded it: no re-quoting of path or query.
        upstream = await client.request(request.method, origin, request.raw_path, head, body, length)
        exchange.status = upstream.status
        response = await relay(request, upstream, reply_headers, key, fingerprint, exchange)
    except asyncio.CancelledError:
        if deadline is None or not deadline.fired:
            raise  # a shutdown's or a client's cancellation, not ours to turn into a 504
        deadline.absorb()
        if exchange.failure is None:
            exchange.failure = Failure(504, "upstream_timeout", "Upstream did not answer in time.")
    except BodyTooLarge:
        pass
    except ConnectTimeout:
        if exchange.failure is None:
            exchange.failure = Failure(502, "upstream_unreachable", "Upstream connect timed out.")
    except (UpstreamError, aiohttp.ClientError, OSError) as exc:
        if exchange.failure is None:
            why = str(exc) if isinstance(exc, UpstreamError) else type(exc).__name__
            exchange.failure = Failure(502, "upstream_unreachable", f"Upstream unreachable: {why}.")
    else:
        exchange.latency_ms = (loop.time() - started) * 1000.0
        return response
    finally:
        if deadline is not None:
            deadline.finish()
        if upstream is not None:
            upstream.release()
    exchange.latency_ms = (loop.time() - started) * 1000.0
    if exchange.sent:
        # The status line had gone out; nothing to do but cut the client's connection.
        exchange.broken = True
        if request.transport is not None:
            request.transport.close()
        return None
    return None
