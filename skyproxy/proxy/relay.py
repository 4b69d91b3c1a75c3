"""The upstream's answer, relayed to the client as it arrives.

A small answer of known length goes out in one write; anything else streams. An error
answer (4xx, 5xx) is decoded and scrubbed of the key on its way, in case the upstream
echoes it. Each relay records on the exchange's `Outcome` when the status line went out
and whether the client left before the end.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from skyproxy import codings
from skyproxy.http1.client import Response
from skyproxy.proxy import links
from skyproxy.proxy.exchange import CAPTURE_LIMIT, EVENT_STREAM_CAPTURE, SMALL_BODY, Outcome
from skyproxy.proxy.headers import DROP_RESPONSE
from skyproxy.proxy.scrub import Scrubber


async def relay(
    request: web.BaseRequest,
    upstream: Response,
    reply_headers: CIMultiDict[str],
    key: str,
    fingerprint: str,
    outcome: Outcome,
    rewrite: links.Rewrite | None = None,
) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason or None)
    headers = response.headers
    for name, value in upstream.headers:
        lower = name.lower()
        # The proxy answers CORS itself, for its own allowed origins; the upstream's
        # (say `Access-Control-Allow-Origin: *`) would contradict or widen that.
        if lower not in DROP_RESPONSE and not lower.startswith("access-control-"):
            headers.add(name, value.replace(key, fingerprint) if key in value else value)
    headers.extend(reply_headers)
    # A Location means something on a 201, 202 or 3xx, never on the polls' 200.
    if rewrite is not None and upstream.status != 200 and "Location" in headers:
        headers["Location"] = rewrite.location(headers["Location"])
    outcome.content_encoding = upstream.content_encoding
    if upstream.status >= 400:
        return await _relay_scrubbed(request, upstream, response, key, fingerprint, outcome)
    length = upstream.content_length
    if length is not None and length <= SMALL_BODY and request.method != "HEAD":
        body = await upstream.read()
        if rewrite is not None and upstream.status < 300:
            body = rewrite.body(body)
        small = _small_response(upstream, response, body, outcome)
        # Sent here, not by aiohttp after the handler returns: the client must not wait
        # for the audit and metrics work that follows the exchange.
        await small.prepare(request)
        outcome.sent = True
        try:
            await small.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            outcome.broken = True
        return small
    await response.prepare(request)
    outcome.sent = True
    prefix = outcome.response_prefix
    limit = CAPTURE_LIMIT
    if upstream.content_type == "text/event-stream":
        limit = EVENT_STREAM_CAPTURE
    try:
        async for chunk in upstream.iter_any():
            if prefix is not None and len(prefix) < limit:
                prefix += chunk[: limit - len(prefix)]
            await response.write(chunk)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        outcome.broken = True  # the client left; the upstream connection is closed on release
    return response


def _small_response(
    upstream: Response, streaming: web.StreamResponse, body: bytes, outcome: Outcome
) -> web.StreamResponse:
    headers = streaming.headers
    del headers["Content-Length"]  # web.Response sets it from the body
    response = web.Response(
        status=upstream.status, reason=upstream.reason or None, headers=headers, body=body
    )
    if outcome.response_prefix is not None:
        outcome.response_prefix = body
    return response


async def _relay_scrubbed(
    request: web.BaseRequest,
    upstream: Response,
    response: web.StreamResponse,
    key: str,
    fingerprint: str,
    outcome: Outcome,
) -> web.StreamResponse:
    headers = response.headers
    headers.popall("Content-Length", None)
    decoder = codings.decoder(headers.get("Content-Encoding"))
    if decoder is not None:
        del headers["Content-Encoding"]
    scrubber = Scrubber(key.encode(), fingerprint.encode())
    prefix = outcome.response_prefix
    await response.prepare(request)
    outcome.sent = True
    async for chunk in upstream.iter_any():
        plain = decoder.decompress(chunk) if decoder else chunk
        if prefix is not None and len(prefix) < CAPTURE_LIMIT:
            prefix += plain[: CAPTURE_LIMIT - len(prefix)]
        await response.write(scrubber.feed(plain))
    if decoder:
        await response.write(scrubber.feed(decoder.flush()))
        outcome.content_encoding = None
    await response.write(scrubber.finish())
    await response.write_eof()
    return response
