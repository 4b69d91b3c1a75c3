"""The embedded mock Skytells upstream: an aiohttp Application that follows the known API.

It serves offline development, the README's first run and the tests, so there is one
fake and not two. It accepts only the keys in `MockState.accepted_keys`, which makes a
key that failed to be injected show up as the real API's 401.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from skyproxy.mock import webhooks

PRICES = {"truefusion-pro": 0.03, "truefusion": 0.02, "lumo": 1.12}
_UNAUTHORIZED = {
    "status": False,
    "response": "Unauthorized",
    "error": {
        "http_status": 401,
        "message": "Invalid or missing API key",
        "error_id": "UNAUTHORIZED",
    },
}


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class MockState:
    accepted_keys: set[str]
    delay: float = 2.0
    stream_interval: float = 0.02
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: deque[SeenRequest] = field(default_factory=lambda: deque(maxlen=1000))
    cancel_spelling: str = "cancelled"  # the real API uses both spellings


MOCK_STATE = web.AppKey("mock_state", MockState)


def create_mock_app(accepted_keys: Iterable[str], delay: float = 2.0) -> web.Application:
    app = web.Application(middlewares=[_envelope, _auth], client_max_size=1024**3)
    app[MOCK_STATE] = MockState(set(accepted_keys), delay)
    app.cleanup_ctx.append(webhooks.sender)
    app.router.add_post("/v1/predictions", _create)
    app.router.add_post("/v1/predict", _create)
    app.router.add_get("/v1/predictions", _list)
    app.router.add_get("/v1/predictions/{id}", _get)
    app.router.add_post("/v1/predictions/{id}/cancel", _cancel)
    app.router.add_delete("/v1/predictions/{id}", _delete)
    app.router.add_delete("/v1/predictions/{id}/delete", _delete)  # the official SDKs' path
    app.router.add_get("/v1/predictions/{id}/stream", _stream)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/model/{slug}", _model)  # the official SDKs' path
    app.router.add_get("/v1/models/{slug}", _model)  # the API reference's
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/responses", _responses)
    app.router.add_route("*", "/v1/echo", _echo)
    return app


def _error(status: int, error_id: str, message: str) -> web.Response:
    body = {
        "status": False,
        "response": message,
        "error": {"http_status": status, "message": message, "error_id": error_id},
    }
    return web.json_response(body, status=status)


@web.middleware
async def _envelope(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unknown paths and methods answer in the API's error envelope, never plain text."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPNotFound:
        return _error(404, "NOT_FOUND", f"No route for {request.method} {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return _error(405, "METHOD_NOT_ALLOWED", f"{request.method} is not allowed here; use {allowed}")
    return response


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    state = request.app[MOCK_STATE]
    state.seen.append(SeenRequest(request.method, request.path_qs, dict(request.headers)))
    if request.headers.get("x-api-key") not in state.accepted_keys:
        return web.json_response(_UNAUTHORIZED, status=401)
    response: web.StreamResponse = await handler(request)
    return response


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _json_body(request: web.Request, *, model: bool) -> dict[str, Any] | web.Response:
    """The JSON object sent, or the API's 422 answer."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(422, "VALIDATION_ERROR", "The request body must be JSON")
    if model and not (isinstance(body, dict) and isinstance(body.get("model"), str)):
        return _error(422, "VALIDATION_ERROR", "The model field is required")
    if not isinstance(body, dict):
        return _error(422, "VALIDATION_ERROR", "The request body must be a JSON object")
    return body


async def _create(request: web.Request) -> web.Response:
    body = await _json_body(request, model=True)
    if isinstance(body, web.Response):
        return body
    state = request.app[MOCK_STATE]
    pid = str(uuid.uuid4())
    base = f"{request.scheme}://{request.host}/v1/predictions/{pid}"
    prediction = {
        "id": pid,
        "status": "starting",
        "type": "inference",
        "model": body["model"],
        "input": body.get("input", {}),
        "output": None,
        "error": None,
        "created_at": _now(),
        "urls": {"get": base, "cancel": f"{base}/cancel", "stream": f"{base}/stream", "delete": base},
        "metrics": {},
        "metadata": {"billing": {"credits_used": 0}},
        "_created": time.monotonic(),
    }
    state.predictions[pid] = prediction
    url = webhooks.url_of(body)
    if url is not None:
        key = request.headers.get("x-api-key", "")  # Skytells signs with the key that created it
        webhooks.deliver(
            request.app, url, key, lambda: _public(prediction), lambda: _finish(state, prediction)
        )
    if body.get("await") is True:
        # The real API holds the answer until the prediction is done (the SDKs' run()).
        await asyncio.sleep(state.delay)
        _advance(state, prediction)
    return web.json_response(_public(prediction), status=201)


async def _finish(state: MockState, prediction: dict[str, Any]) -> None:
    """Waits until the prediction is done, as a poll would find it."""
    while True:
        _advance(state, prediction)
        if prediction["status"] in ("succeeded", "failed", state.cancel_spelling):
            return
        await asyncio.sleep(max(state.delay - (time.monotonic() - prediction["_created"]), 0.01))


def _public(prediction: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in prediction.items() if not k.startswith("_")}


def _advance(state: MockState, prediction: dict[str, Any]) -> None:
    if prediction["status"] in ("succeeded", "failed", state.cancel_spelling):
        return
    elapsed = time.monotonic() - prediction["_created"]
    if elapsed < state.delay:
        prediction["status"] = "processing"
        prediction["metrics"] = {"progress": round(min(elapsed / max(state.delay, 1e-9), 1), 2)}
        return
    prediction.update(
        status="succeeded",
        output=[f"https://cdn.skytells.ai/mock/{prediction['id']}/0.png"],
        completed_at=_now(),
        metrics={"predict_time": state.delay, "total_time": state.delay, "image_count": 1},
        metadata={"billing": {"credits_used": PRICES.get(prediction["model"], 0.01)}},
    )


async def _get(request: web.Request) -> web.Response:
    state = request.app[MOCK_STATE]
    prediction = state.predictions.get(request.match_info["id"])
    if prediction is None:
        return _error(404, "PREDICTION_NOT_FOUND", "Prediction not found")
    _advance(state, prediction)
    return web.json_response(_public(prediction))


async def _cancel(request: web.Request) -> web.Response:
    state = request.app[MOCK_STATE]
    prediction = state.predictions.get(request.match_info["id"])
    if prediction is None:
        return _error(404, "PREDICTION_NOT_FOUND", "Prediction not found")
    _advance(state, prediction)
    if prediction["status"] != "succeeded":
        prediction.update(status=state.cancel_spelling, completed_at=_now())
    return web.json_response(_public(prediction))


async def _delete(request: web.Request) -> web.Response:
    state = request.app[MOCK_STATE]
    if state.predictions.pop(request.match_info["id"], None) is None:
        return _error(404, "PREDICTION_NOT_FOUND", "Prediction not found")
    return web.json_response({"success": True})


async def _list(request: web.Request) -> web.Response:
    state = request.app[MOCK_STATE]
    items = [_public(p) for p in state.predictions.values()]
    try:
        per_page = max(1, min(50, int(request.query.get("per_page", "20") or 20)))
        page = max(1, int(request.query.get("page", "1") or 1))
    except ValueError:
        return _error(422, "VALIDATION_ERROR", "page and per_page must be integers")
    chunk = items[(page - 1) * per_page : page * per_page]
    pagination = {"page": page, "per_page": per_page, "total": len(items)}
    return web.json_response({"data": chunk, "pagination": pagination})


def _model_of(slug: str, price: float) -> dict[str, Any]:
    return {
        "slug": slug,
        "name": slug.replace("-", " ").title(),
        "pricing": {"amount": price, "currency": "USD", "unit": "prediction"},
        "metadata": {"edge_compatible": False},
    }


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"data": [_model_of(slug, price) for slug, price in PRICES.items()]})


async def _model(request: web.Request) -> web.Response:
    slug = request.match_info["slug"]
    if slug not in PRICES:
        return _error(404, "MODEL_NOT_FOUND", f"Model {slug} not found")
    return web.json_response(_model_of(slug, PRICES[slug]))


async def _stream(request: web.Request) -> web.StreamResponse:
    """The prediction's events over SSE, or the prediction itself to a client asking for JSON."""
    state = request.app[MOCK_STATE]
    prediction = state.predictions.get(request.match_info["id"])
    if prediction is None:
        return _error(404, "PREDICTION_NOT_FOUND", "Prediction not found")
    if "text/event-stream" not in request.headers.get("Accept", ""):
        _advance(state, prediction)
        return web.json_response(_public(prediction))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    while True:
        _advance(state, prediction)
        await response.write(f"data: {json.dumps(_public(prediction))}\n\n".encode())
        if prediction["status"] in ("succeeded", "failed", state.cancel_spelling):
            break
        await asyncio.sleep(max(state.stream_interval, min(state.delay / 10, 0.5)))
    await response.write_eof()
    return response


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request, model=False)
    if isinstance(body, web.Response):
        return body
    state = request.app[MOCK_STATE]
    words = ["Hello", " from", " the", " skyproxy", " mock", "."]
    cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
    if not body.get("stream"):
        message = {"role": "assistant", "content": "".join(words)}
        return web.json_response(
            {"id": cid, "object": "chat.completion", "choices": [{"index": 0, "message": message}]}
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for word in words:
        chunk = {
            "id": cid,
            "object": "chat.completion.chunk",
            "choices": [{"delta": {"content": word}}],
        }
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await asyncio.sleep(state.stream_interval)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _responses(request: web.Request) -> web.Response:
    body = await _json_body(request, model=True)
    if isinstance(body, web.Response):
        return body
    text = {"type": "output_text", "text": "Hello from the skyproxy mock."}
    return web.json_response(
        {
            "id": f"resp_{uuid.uuid4().hex[:12]}",
            "object": "response",
            "status": "completed",
            "model": body["model"],
            "output": [{"type": "message", "role": "assistant", "content": [text]}],
        }
    )


async def _echo(request: web.Request) -> web.Response:
    """Echoes what arrived (method, path, query, body digest), for pass-through checks."""
    import hashlib

    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "size": size,
            "sha256": digest.hexdigest(),
        }
    )
