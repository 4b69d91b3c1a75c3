"""The receiver on a real port: verified, stored durably, deduplicated; nothing else served."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from helpers import CANARY
from helpers.daemon import eventually
from helpers.http import assert_error, fetch, http_head, raw_request
from helpers.webhooks import Hooks, add_route, signed, start_target

from skyproxy.webhooks.store import Listing, Store

BODY = b'{"id":"p-1","status":"succeeded","metadata":{"billing":{"credits_used":0.03}}}'


def listing(hooks: Hooks) -> list[Listing]:
    store = Store(hooks.store_path)
    try:
        return store.listing()
    finally:
        store.close()


async def test_a_signed_event_is_stored_and_answered_200(hooks: Hooks, servers: list[TestServer]) -> None:
    target = await start_target(servers)
    route = add_route(hooks.store_path, target.url)
    async with aiohttp.ClientSession() as session:
        status, _, body = await fetch(
            session, "POST", f"{hooks.url}/hooks/dev/{route}", data=BODY, headers=signed(BODY, CANARY)
        )
    assert status == 200, body
    [event] = listing(hooks)
    assert (event.environment, event.prediction_id, event.event) == ("dev", "p-1", "succeeded")
    assert hooks.stats.received == 1
    [arrival] = hooks.arrivals
    assert arrival.body.prediction is not None and arrival.route.user_id == "alice"


async def test_the_previous_key_is_accepted_during_a_rotation(
    hooks: Hooks, servers: list[TestServer]
) -> None:
    route = add_route(hooks.store_path, "http://127.0.0.1:9/x")
    async with aiohttp.ClientSession() as session:
        status, _, _ = await fetch(
            session,
            "POST",
            f"{hooks.url}/hooks/dev/{route}",
            data=BODY,
            headers=signed(BODY, "sk-previous-key"),
        )
    assert status == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Skytells-Signature": ""},
        {"X-Skytells-Signature": "0" * 64},
        signed(BODY, "sk-some-other-key"),
        signed(BODY + b" ", CANARY),
    ],
)
async def test_a_missing_or_wrong_signature_is_401_and_stores_nothing(
    hooks: Hooks, headers: dict[str, str]
) -> None:
    route = add_route(hooks.store_path, "http://127.0.0.1:9/x")
    async with aiohttp.ClientSession() as session:
        answer = await fetch(session, "POST", f"{hooks.url}/hooks/dev/{route}", data=BODY, headers=headers)
    assert_error(401, "invalid_signature", answer)
    assert listing(hooks) == []
    assert hooks.stats.refused_signature == 1
    assert hooks.stats.received == 0


async def test_unknown_routes_and_environments_are_404(hooks: Hooks) -> None:
    async with aiohttp.ClientSession() as session:
        unknown = await fetch(
            session, "POST", f"{hooks.url}/hooks/dev/{'a' * 32}", data=BODY, headers=signed(BODY, CANARY)
        )
        route = add_route(hooks.store_path, "http://127.0.0.1:9/x", environment="dev")
        other_env = await fetch(
            session, "POST", f"{hooks.url}/hooks/prod/{route}", data=BODY, headers=signed(BODY, CANARY)
        )
    assert_error(404, "unknown_route", unknown)
    assert_error(404, "unknown_route", other_env)
    assert listing(hooks) == []


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/predictions", 404, "not_found"),
        ("POST", "/v1/predictions", 404, "not_found"),
        ("GET", "/-/status", 404, "not_found"),
        ("GET", "/-/metrics", 404, "not_found"),
        ("POST", "/-/reload", 404, "not_found"),
        ("GET", "/hooks/dev/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", 405, "method_not_allowed"),
        ("POST", "/hooks/dev/short", 404, "not_found"),
        ("POST", "/hooks/dev/../../v1/x", 404, "not_found"),
    ],
)
async def test_only_the_hooks_and_health_are_served(
    hooks, method: str, path: str, status: int, code: str
) -> None:
    request = http_head(method, path, [("Host", "x"), ("Content-Length", "0")])
    assert_error(status, code, await raw_request(hooks.url, request))


async def test_health(hooks: Hooks) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{hooks.url}/-/health") as answer:
        assert answer.status == 200
        assert await answer.json() == {"status": "ok"}


async def test_a_body_over_the_limit_is_413_while_it_arrives(hooks: Hooks) -> None:
    route = add_route(hooks.store_path, "http://127.0.0.1:9/x")
    big = b"x" * 5000
    async with aiohttp.ClientSession() as session:
        declared = await fetch(
            session, "POST", f"{hooks.url}/hooks/dev/{route}", data=big, headers=signed(big, CANARY)
        )

        async def chunks():
            for _ in range(100):
                yield b"y" * 1000

        streamed = await fetch(
            session, "POST", f"{hooks.url}/hooks/dev/{route}", data=chunks(), headers=signed(b"", CANARY)
        )
    assert_error(413, "body_too_large", declared)
    assert_error(413, "body_too_large", streamed)
    assert listing(hooks) == []


async def test_a_duplicate_is_200_and_relayed_once(hooks: Hooks, servers: list[TestServer]) -> None:
    target = await start_target(servers)
    route = add_route(hooks.store_path, target.url)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            status, _, _ = await fetch(
                session, "POST", f"{hooks.url}/hooks/dev/{route}", data=BODY, headers=signed(BODY, CANARY)
            )
            assert status == 200
    await eventually(lambda: len(target.hits) == 1, "the event relayed")
    await eventually(lambda: listing(hooks)[0].status == "delivered", "marked delivered")
    assert hooks.stats.duplicates == 2
    assert len(listing(hooks)) == 1
    assert len(target.hits) == 1
