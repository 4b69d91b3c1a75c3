"""The exchange with the upstream: the request sent on with the key, the answer relayed back.

Both ways stream, under one deadline that moves with the exchange (deadlines.py): the
client's body may pause for up to `idle_timeout` at a time, the answer's head then has
`upstream_timeout` to arrive, and the answer's body may again pause for up to
`idle_timeout` at a time, however long it runs. Every way it can fail ends here as a
`Failure` on the returned `Outcome`: a connect failure is a 502, an upload that stalls a
408, an answer that does not come a 504, a body over the limit a 413, an answer the
relay cannot inspect a 502. Once the status line is out, a failure cuts the client's
connection instead.
"""

from __future__ import annotations

import asyncio

import aiohttp

from skyproxy.http1 import ConnectTimeout, ReadTimeout, Response, UpstreamError, WriteTimeout
from skyproxy.proxy import links
from skyproxy.proxy.body import Body, BodyTooLarge, too_large, upload
from skyproxy.proxy.deadlines import Phase
from skyproxy.proxy.decoded import Unrelayable
from skyproxy.proxy.exchange import Call, Failure, Outcome, Route
from skyproxy.proxy.headers import outbound_head
from skyproxy.proxy.relay import cut, relay

TIMED_OUT = Failure(504, "upstream_timeout", "Upstream did not answer in time.")
# The unread rest of a body is on the connection: it must not be parsed as a request.
BODY_TIMED_OUT = Failure(408, "body_timeout", "The request body stopped arriving.", close=True)
_FIRED = {
    Phase.UPLOAD: BODY_TIMED_OUT,
    Phase.SEND: Failure(504, "upstream_timeout", "Upstream stopped taking the request body.", close=True),
    Phase.HEAD: TIMED_OUT,
    Phase.BODY: Failure(504, "upstream_timeout", "Upstream went silent before the answer's end."),
}
CONNECT_TIMED_OUT = Failure(502, "upstream_unreachable", "Upstream connect timed out.")


async def forward(route: Route, call: Call, read_body: bytes | None = None) -> Outcome:
    """Run one exchange. The outcome holds the answer relayed, or the failure to answer with.

    `read_body` is a body the handler already read, and may have rewritten (a create
    naming a webhook); it goes on as it is.
    """
    request = call.request
    kind = call.kind
    outcome = Outcome(
        # The audit reads the model from a creating request, and every event's answer.
        request_prefix=read_body if read_body is not None else bytearray() if kind == "create" else None,
        response_prefix=bytearray() if kind is not None else None,
    )
    secret = route.key.reveal().encode()
    head = outbound_head(request.raw_headers, secret, call.request_id, route.user_header)
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = route.deadlines.arm(route.idle_timeout, Phase.UPLOAD, route.shortest)
    upstream: Response | None = None
    try:
        if read_body is not None:
            body: Body = read_body
            length = None
        else:
            body, length = await upload(request, route, outcome, deadline)
        if body is None or isinstance(body, bytes):  # else the upload's end starts that wait
            deadline.enter(Phase.HEAD, route.head_timeout)
        # The target goes on as the client encoded it: no re-quoting of path or query.
        upstream = await route.client.request(
            request.method, route.origin, request.raw_path, head, body, length
        )
        outcome.status = upstream.status
        deadline.enter(Phase.BODY, route.idle_timeout)
        # Links in answers on prediction paths come back through the proxy.
        path = request.path
        rewrite = (
            links.rewrite_for(call.env.base_url, request.host)
            if path.startswith(links.PREDICTIONS) or path == links.PREDICT
            else None
        )
        outcome.response = await relay(call, upstream, route, secret, outcome, deadline, rewrite)
    except asyncio.CancelledError:
        if not deadline.fired:
            raise  # a shutdown's or a client's cancellation, not ours to turn into a 504
        deadline.absorb()
        outcome.failure = _FIRED[deadline.phase]
    except Unrelayable as exc:
        outcome.failure = exc.failure
    except BodyTooLarge:
        outcome.failure = too_large(route.max_body_bytes)
    except ConnectTimeout:
        outcome.failure = CONNECT_TIMED_OUT
    except (ReadTimeout, WriteTimeout):
        outcome.failure = TIMED_OUT
    except (UpstreamError, aiohttp.ClientError, OSError) as exc:
        why = str(exc) if isinstance(exc, UpstreamError) else type(exc).__name__
        outcome.failure = Failure(502, "upstream_unreachable", f"Upstream unreachable: {why}.")
    finally:
        deadline.finish()
        if upstream is not None:
            upstream.release()
    outcome.latency_ms = (loop.time() - started) * 1000.0
    failure = outcome.failure
    if failure is not None:
        outcome.status = failure.status
        if outcome.sent:
            # The status line had gone out: cut the client's connection, so the answer it
            # got so far can never pass for a whole one.
            outcome.broken = True
            if request.transport is not None:
                cut(request.transport)
    return outcome
