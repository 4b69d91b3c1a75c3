"""Skytells' official Python SDK, pointed at skyproxy in front of the embedded mock.

This is the first thing many users do, so every SDK call runs through the real proxy
with a placeholder key: the proxy injects the environment's key, the mock checks it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
import skytells
from helpers import CANARY, assert_no_canary, env_config

PLACEHOLDER = "not-a-real-key"  # what an app gives the SDK: the proxy drops it


@pytest.fixture
async def sdk(mock_upstream, start_proxy, canary_env) -> Any:  # type: ignore[no-untyped-def]
    url, state = mock_upstream
    state.delay = 0.2
    proxy = await start_proxy(env_config(url))
    client = skytells.SkytellsClient(
        api_key=PLACEHOLDER, base_url=f"{proxy.url}/v1", headers={"X-User-Id": "alice"}
    )
    return client, proxy, state


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


async def test_every_sdk_call_works_through_the_proxy(sdk) -> None:  # type: ignore[no-untyped-def]
    client, _, state = sdk
    created = await call(client.predictions.create, {"model": "truefusion-pro", "input": {"prompt": "a"}})
    assert created["status"] in ("starting", "processing")
    done = await call(client.wait, created, {"interval": 50, "max_wait": 10_000})
    assert done["status"] == "succeeded" and done["output"]
    assert (await call(client.predictions.get, created["id"]))["id"] == created["id"]
    page = await call(client.predictions.list)
    assert any(item["id"] == created["id"] for item in page.data)
    models = await call(client.models.list)
    listed = models["data"] if isinstance(models, dict) else models  # the mock wraps it; the SDK types a list
    assert {m["slug"] for m in listed} >= {"truefusion-pro"}
    assert (await call(client.models.get, "truefusion-pro"))["slug"] == "truefusion-pro"
    assert (await call(client.stream_prediction, created["id"]))["id"] == created["id"]

    ran = await call(client.run, "truefusion-pro", input={"prompt": "a lighthouse"})
    assert ran.output, "run() sends await: true and must get the finished prediction"

    cancelable = await call(client.predictions.create, {"model": "lumo", "input": {"prompt": "b"}})
    canceled = await call(client.cancel_prediction, cancelable["id"])
    assert canceled["status"] in ("cancelled", "canceled", "succeeded")
    deleted = await call(client.delete_prediction, cancelable["id"])
    assert isinstance(deleted, dict)

    assert all(seen.headers.get("x-api-key") != PLACEHOLDER for seen in state.seen)
    assert_no_canary(json.dumps([created, done, page.data, deleted], default=str))


async def test_an_unknown_model_is_a_json_error_the_sdk_understands(sdk) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = sdk
    with pytest.raises(skytells.SkytellsError) as caught:
        await call(client.models.get, "no-such-model")
    assert "non-JSON" not in str(caught.value)
    assert CANARY not in str(caught.value)
