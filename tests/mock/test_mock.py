"""The embedded mock follows the known Skytells API: shapes, progress, errors.

Served as a real server on an ephemeral port; one test runs it the way `upstream = "mock"`
does, behind the proxy with a generated key.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from helpers import env_config

from skyproxy.mock.app import MOCK_STATE, PRICES, MockState, create_mock_app

KEY = "sk-mock-test-" + "0123456789abcdef"
UNAUTHORIZED = {
    "status": False,
    "response": "Unauthorized",
    "error": {"http_status": 401, "message": "Invalid or missing API key", "error_id": "UNAUTHORIZED"},
}
DELAY = 0.3


class Client:
    def __init__(self, base: str, session: aiohttp.ClientSession, state: MockState) -> None:
        self.base = base
        self.session = session
        self.state = state

    async def call(self, method: str, path: str, *, key: str | None = KEY, **kwargs: Any) -> tuple[int, Any]:
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["x-api-key"] = key
        async with self.session.request(method, f"{self.base}{path}", headers=headers, **kwargs) as r:
            body = await r.read()
            return r.status, json.loads(body) if body else None

    async def create(self, model: str = "truefusion-pro", path: str = "/v1/predictions") -> dict[str, Any]:
        status, body = await self.call("POST", path, json={"model": model, "input": {"prompt": "a fox"}})
        assert status == 201, body
        return dict(body)

    async def wait_for(self, pid: str, wanted: str, deadline_s: float = 10) -> dict[str, Any]:
        """Polls like a client would; the mock moves on its own clock."""
        deadline = time.monotonic() + deadline_s
        while True:
            status, body = await self.call("GET", f"/v1/predictions/{pid}")
            assert status == 200, body
            if body["status"] == wanted:
                return dict(body)
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.05)


@pytest.fixture
async def mock() -> AsyncIterator[Client]:
    app = create_mock_app([KEY], delay=DELAY)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Client(str(server.make_url("")).rstrip("/"), session, app[MOCK_STATE])
    finally:
        await server.close()


def iso_z(value: object) -> bool:
    return isinstance(value, str) and value.endswith("Z") and "T" in value


@pytest.mark.parametrize("path", ["/v1/predictions", "/v1/predict"])
async def test_create_answers_201_with_a_starting_prediction(path, mock):
    body = await mock.create(path=path)
    uuid.UUID(body["id"])
    assert body["status"] == "starting"
    assert body["type"] == "inference"
    assert body["model"] == "truefusion-pro"
    assert body["input"] == {"prompt": "a fox"}
    assert body["output"] is None
    assert body["error"] is None
    assert iso_z(body["created_at"])
    base = f"{mock.base}/v1/predictions/{body['id']}"
    assert body["urls"] == {
        "get": base,
        "cancel": f"{base}/cancel",
        "stream": f"{base}/stream",
        "delete": base,
    }
    assert body["metrics"] == {}
    assert body["metadata"]["billing"]["credits_used"] == 0
    assert not any(k.startswith("_") for k in body)


async def test_prediction_progresses_to_succeeded_after_the_delay(mock):
    created = await mock.create(model="lumo")
    status, first = await mock.call("GET", f"/v1/predictions/{created['id']}")
    assert status == 200
    assert first["status"] == "processing"
    assert 0 <= first["metrics"]["progress"] < 1
    done = await mock.wait_for(created["id"], "succeeded")
    assert done["output"] == [f"https://cdn.skytells.ai/mock/{created['id']}/0.png"]
    assert iso_z(done["completed_at"])
    assert done["metrics"]["predict_time"] == DELAY
    assert done["metadata"]["billing"]["credits_used"] == PRICES["lumo"]
    _, again = await mock.call("GET", f"/v1/predictions/{created['id']}")
    assert again == done  # terminal: no further change


@pytest.mark.parametrize("spelling", ["cancelled", "canceled"])
async def test_cancel_stops_a_running_prediction(spelling, mock):
    mock.state.cancel_spelling = spelling
    created = await mock.create()
    status, body = await mock.call("POST", f"/v1/predictions/{created['id']}/cancel")
    assert status == 200
    assert body["status"] == spelling
    assert body["output"] is None
    await asyncio.sleep(DELAY + 0.1)  # past the point it would have succeeded
    _, later = await mock.call("GET", f"/v1/predictions/{created['id']}")
    assert later["status"] == spelling


async def test_cancel_after_success_keeps_the_result(mock):
    created = await mock.create()
    done = await mock.wait_for(created["id"], "succeeded")
    status, body = await mock.call("POST", f"/v1/predictions/{created['id']}/cancel")
    assert status == 200
    assert body["status"] == "succeeded"
    assert body["output"] == done["output"]


async def test_delete_then_get_is_404(mock):
    created = await mock.create()
    assert await mock.call("DELETE", f"/v1/predictions/{created['id']}") == (200, {"success": True})
    status, body = await mock.call("GET", f"/v1/predictions/{created['id']}")
    assert status == 404
    assert body["status"] is False
    assert body["error"]["http_status"] == 404
    assert body["error"]["error_id"] == "PREDICTION_NOT_FOUND"
    status, body = await mock.call("DELETE", f"/v1/predictions/{created['id']}")
    assert status == 404


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_unknown_prediction_is_404(method, mock):
    path = f"/v1/predictions/{uuid.uuid4()}" + ("/cancel" if method == "POST" else "")
    status, body = await mock.call(method, path)
    assert status == 404
    assert body["error"]["error_id"] == "PREDICTION_NOT_FOUND"


async def test_list_pages_through_predictions(mock):
    ids = [(await mock.create())["id"] for _ in range(3)]
    status, body = await mock.call("GET", "/v1/predictions")
    assert status == 200
    assert [p["id"] for p in body["data"]] == ids
    assert body["pagination"] == {"page": 1, "per_page": 20, "total": 3}
    _, page = await mock.call("GET", "/v1/predictions?per_page=2&page=2")
    assert [p["id"] for p in page["data"]] == ids[2:]
    assert page["pagination"] == {"page": 2, "per_page": 2, "total": 3}
    _, capped = await mock.call("GET", "/v1/predictions?per_page=500")
    assert capped["pagination"]["per_page"] == 50


async def test_models_list_with_pricing(mock):
    status, body = await mock.call("GET", "/v1/models")
    assert status == 200
    slugs = {m["slug"]: m for m in body["data"]}
    assert set(slugs) == set(PRICES)
    for slug, model in slugs.items():
        assert model["pricing"] == {"amount": PRICES[slug], "currency": "USD", "unit": "prediction"}
        assert model["metadata"]["edge_compatible"] is False
        assert model["name"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/predictions"),
        ("POST", "/v1/predict"),
        ("GET", "/v1/predictions"),
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/echo"),
    ],
)
@pytest.mark.parametrize("key", ["sk-wrong", None, KEY.upper(), KEY[:-1], KEY + "0"])
async def test_wrong_or_missing_key_is_the_real_401(method, path, key, mock):
    status, body = await mock.call(method, path, key=key, json={"model": "truefusion-pro"})
    assert (status, body) == (401, UNAUTHORIZED)
    assert not mock.state.predictions


async def test_bearer_token_alone_is_not_accepted(mock):
    status, body = await mock.call("GET", "/v1/models", key=None, headers={"Authorization": f"Bearer {KEY}"})
    assert (status, body) == (401, UNAUTHORIZED)


async def test_mock_records_what_it_saw(mock):
    await mock.call("GET", "/v1/models?x=1")
    seen = mock.state.seen[-1]
    assert (seen.method, seen.path) == ("GET", "/v1/models?x=1")
    assert seen.headers["x-api-key"] == KEY


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json", "The request body must be JSON"),
        (b'{"input": {}}', "The model field is required"),
        (b"[1]", "The model field is required"),
    ],
)
async def test_create_validates_the_body(payload, message, mock):
    status, body = await mock.call(
        "POST", "/v1/predictions", data=payload, headers={"Content-Type": "application/json"}
    )
    assert status == 422
    assert body["error"] == {"http_status": 422, "message": message, "error_id": "VALIDATION_ERROR"}
    assert not mock.state.predictions


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/predictions?per_page=many", None),
        ("/v1/predictions?page=x", None),
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", b'["a list"]'),
    ],
)
async def test_bad_input_is_422_not_a_crash(path, payload, mock):
    method = "GET" if payload is None else "POST"
    status, body = await mock.call(method, path, data=payload)
    assert status == 422
    assert body["status"] is False
    assert body["error"]["error_id"] == "VALIDATION_ERROR"


async def test_chat_completion_without_stream(mock):
    status, body = await mock.call("POST", "/v1/chat/completions", json={"model": "m", "messages": []})
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello from the skyproxy mock."}


async def test_echo_reports_what_arrived(mock):
    import hashlib

    payload = b"\x00payload\xff" * 1000
    status, body = await mock.call("PUT", "/v1/echo?a=1&b=%20", data=payload)
    assert status == 200
    assert body == {
        "method": "PUT",
        "path": "/v1/echo",
        "query": "a=1&b= ",
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }


async def test_mock_environment_behind_the_proxy(start_proxy, tmp_path):
    """`upstream = "mock"` with no key: a generated key, injected, and a prediction that completes."""
    body = env_config("mock", key="", extra="[mock]\ndelay = 0.2\n")
    proxy = await start_proxy(body)
    user = {"X-User-Id": "alice"}
    async with proxy.session.post(
        f"{proxy.url}/v1/predictions", json={"model": "truefusion"}, headers=user
    ) as r:
        assert r.status == 201, await r.text()
        pid = (await r.json())["id"]
    deadline = time.monotonic() + 10
    while True:
        async with proxy.session.get(f"{proxy.url}/v1/predictions/{pid}") as r:
            assert r.status == 200
            prediction = await r.json()
        if prediction["status"] == "succeeded":
            break
        assert time.monotonic() < deadline, prediction
        await asyncio.sleep(0.05)
    assert prediction["metadata"]["billing"]["credits_used"] == PRICES["truefusion"]


# -- the paths the official SDKs call, and errors always in the envelope ---------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/nope"), ("GET", "/v1/predictions/"), ("POST", "/v1/models"), ("GET", "/v2/x")],
)
async def test_unknown_paths_and_methods_answer_in_the_error_envelope(
    mock: Client, method: str, path: str
) -> None:
    status, body = await mock.call(method, path)
    assert status in (404, 405)
    assert body["status"] is False and body["error"]["http_status"] == status
    assert body["error"]["error_id"] in ("NOT_FOUND", "METHOD_NOT_ALLOWED")


async def test_await_answers_the_finished_prediction(mock: Client) -> None:
    started = time.monotonic()
    status, body = await mock.call(
        "POST", "/v1/predict", json={"model": "truefusion-pro", "input": {"prompt": "x"}, "await": True}
    )
    assert status == 201
    assert body["status"] == "succeeded" and body["output"]
    assert body["metadata"]["billing"]["credits_used"] == PRICES["truefusion-pro"]
    assert time.monotonic() - started >= DELAY


async def test_one_model_by_slug_singular_and_plural(mock: Client) -> None:
    for path in ("/v1/model/lumo", "/v1/models/lumo"):
        status, body = await mock.call("GET", path)
        assert status == 200 and body["slug"] == "lumo"
        assert body["pricing"]["amount"] == PRICES["lumo"]
    status, body = await mock.call("GET", "/v1/model/nope")
    assert status == 404 and body["error"]["error_id"] == "MODEL_NOT_FOUND"


async def test_the_sdk_delete_path(mock: Client) -> None:
    created = await mock.create()
    status, body = await mock.call("DELETE", f"/v1/predictions/{created['id']}/delete")
    assert status == 200 and body == {"success": True}
    status, _ = await mock.call("GET", f"/v1/predictions/{created['id']}")
    assert status == 404


async def test_stream_serves_events_until_the_end_or_json_on_request(mock: Client) -> None:
    created = await mock.create()
    status, body = await mock.call("GET", f"/v1/predictions/{created['id']}/stream")
    assert status == 200 and body["id"] == created["id"]
    async with mock.session.get(
        f"{mock.base}/v1/predictions/{created['id']}/stream",
        headers={"x-api-key": KEY, "Accept": "text/event-stream"},
    ) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        events = [json.loads(line[5:]) for line in (await r.text()).splitlines() if line.startswith("data:")]
    assert events[-1]["status"] == "succeeded"
    assert len(events) >= 2


async def test_responses_create(mock: Client) -> None:
    status, body = await mock.call("POST", "/v1/responses", json={"model": "gpt-mock", "input": "hi"})
    assert status == 200 and body["object"] == "response" and body["status"] == "completed"
