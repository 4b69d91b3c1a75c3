"""What the proxy records of an exchange: metrics for every one, an audit line for events.

A create is recorded once, as created or failed. A poll or a cancel is recorded only the
first time it shows the prediction's terminal state, however often a client polls. With
[cluster] that first time is across replicas: the local tracker filters, then a shared
claim on the prediction id decides, and the caller awaits what `exchange` returns.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from skyproxy.audit import events
from skyproxy.audit.record import AuditRecord
from skyproxy.proxy.exchange import Call, Outcome
from skyproxy.proxy.runtime import State

log = logging.getLogger("skyproxy")


def exchange(state: State, call: Call, outcome: Outcome) -> Awaitable[None] | None:
    """Metrics for every exchange, and an audit line when it is a prediction event.

    Returns the shared claim of a terminal line to await, under [cluster] only."""
    metrics = state.metrics
    env = call.env
    if outcome.failure is None:
        metrics.latency(env.name, outcome.latency_ms / 1000.0)
    if outcome.status == 401:
        metrics.upstream_unauthorized(env.name)
        log.error(
            "environment %s: key rejected by upstream; revoked or rotated? (401, key %s)",
            env.name,
            env.key.fingerprint,
        )
    elif outcome.status == 429:
        metrics.upstream_rate_limited(env.name)
    kind = call.kind
    if kind == "create":
        _created(state, call, outcome)
    elif kind is not None:
        return _terminal(state, call, outcome)
    return None


def once_across_replicas(
    state: State, prediction_id: str, write: Callable[[], None]
) -> Awaitable[None] | None:
    """`write()` now without [cluster]; with it, the awaitable that writes if this replica claims it."""
    cluster = state.cluster
    if cluster is None:
        write()
        return None
    return _claimed_then(cluster.terminals.first(prediction_id), write)


async def _claimed_then(claim: Awaitable[bool], write: Callable[[], None]) -> None:
    if await claim:
        write()


def rejected(state: State, call: Call, http_status: int = 429) -> None:
    """A create the proxy refused itself: a rate limit (429) or a budget (402)."""
    _audit(state, call, "rejected", http_status=http_status, user=call.user)


def _created(state: State, call: Call, outcome: Outcome) -> None:
    status = outcome.status
    if call.body is not None:  # read and parsed already, to price it
        model = call.model
    else:
        model = events.model_of(events.parse_json(outcome.request_prefix, None))
    answered = 200 <= status < 300
    answer = events.parse_json(outcome.response_prefix, outcome.content_encoding) if answered else None
    prediction_id = answer.get("id") if answer else None
    # A client that left once the upstream had answered does not undo the create: it costs the same.
    ok = answered and (not outcome.broken or isinstance(prediction_id, str))
    model = model or events.model_of(answer)
    if ok and isinstance(prediction_id, str):
        state.tracker.created(prediction_id, model, call.user)
    else:
        prediction_id = None
    cost = call.runtime.settings.pricing.get(model) if ok and model else None
    _audit(
        state,
        call,
        "created" if ok else "failed",
        http_status=status,
        user=call.user,
        model=model,
        prediction_id=prediction_id,
        latency_ms=outcome.latency_ms,
        cost=cost,
    )


def _terminal(state: State, call: Call, outcome: Outcome) -> Awaitable[None] | None:
    status = outcome.status
    body = outcome.response_prefix
    if not 200 <= status < 300 or not events.may_be_terminal(body, outcome.content_encoding):
        return None
    answer = events.parse_json(body, outcome.content_encoding)
    terminal = events.status_of(answer)
    prediction_id = events.prediction_id_of(call.request.path)
    if terminal is None or not state.tracker.first_terminal(prediction_id):
        return None
    created_model, created_user = state.tracker.origin(prediction_id)
    model = events.model_of(answer) or created_model
    cost = events.credits_of(answer)
    if cost is None and model is not None:
        cost = call.runtime.settings.pricing.get(model)
    write = functools.partial(
        _audit,
        state,
        call,
        terminal,
        http_status=status,
        user=call.user or created_user,
        model=model,
        prediction_id=prediction_id,
        latency_ms=outcome.latency_ms,
        cost=cost,
    )
    return once_across_replicas(state, prediction_id, write)


def _audit(
    state: State,
    call: Call,
    status: str,
    *,
    http_status: int,
    user: str | None,
    model: str | None = None,
    prediction_id: str | None = None,
    latency_ms: float | None = None,
    cost: float | None = None,
) -> None:
    """One audit line: the event's own fields, and the request's facts from the call."""
    request = call.request
    env = call.env
    record = AuditRecord(
        environment=env.name,
        userId=user,
        predictionId=prediction_id,
        model=model,
        status=status,
        httpStatus=http_status,
        latencyMs=None if latency_ms is None else round(latency_ms, 1),
        costUsd=cost,
        ipAddress=request.remote,
        requestId=call.request_id,
        keyFingerprint=env.key.fingerprint,
        method=request.method,
        path=request.path,
        client=call.client,
    )
    state.metrics.prediction(env.name, status)
    if not state.audit.submit(record):
        log.error("audit queue full: a %s line for %s was dropped", status, call.request_id)
        return
    # Spend follows the lines the audit holds, and only those.
    state.budgets.record(record.timestamp, env.name, user, call.client, status, prediction_id, cost)
