"""Client tokens through a real proxy: required, optional, the wrong environment, revoked while
running, expired, both headers, identity binding; the token and the key never leak."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from helpers import CANARY, VENV_BIN, env_config
from helpers.access import Recorder, all_logs, assert_secrets_absent, files_text, log_text
from helpers.daemon import CREATE, audit_lines, eventually
from helpers.http import assert_error, fetch

from skyproxy.tokens import store

NO_LIMITS = "[rate_limit]\nenabled = false\n"


async def proxy_for(
    start_proxy: Callable[..., Any], upstream: str, mode: str, rules: str = NO_LIMITS, extra: str = ""
) -> Any:
    return await start_proxy(
        env_config(upstream, env_extra=f'client_auth = "{mode}"', rules=rules, extra=extra)
    )


async def post(proxy: Any, headers: dict[str, str], path: str = "/v1/predictions") -> tuple[int, Any, bytes]:
    return await fetch(proxy.session, "POST", f"{proxy.url}{path}", json=CREATE, headers=headers)


@pytest.fixture
async def recorder(raw_upstream: Callable[..., Any]) -> tuple[str, Recorder]:
    upstream = Recorder()
    return await raw_upstream(upstream.app()), upstream


async def test_required_refuses_a_request_without_a_token_before_the_upstream(
    tmp_path: Path, canary_env: str, start_proxy: Callable[..., Any], recorder: tuple[str, Recorder]
) -> None:
    url, upstream = recorder
    proxy = await proxy_for(start_proxy, url, "required")
    for headers in ({}, {"x-api-key": "sk-a-real-looking-key"}, {"Authorization": "Basic dXNlcjpwYXNz"}):
        answer = await post(proxy, {"X-User-Id": "alice", **headers})
        assert_error(401, "token_required", answer)
        assert answer[1]["WWW-Authenticate"] == 'Bearer realm="skyproxy"'
    assert upstream.heads == []
    assert audit_lines(proxy.audit_path) == []


@pytest.mark.parametrize("how", ["x-api-key", "bearer"])
async def test_a_valid_token_is_swapped_for_the_key(
    tmp_path: Path, canary_env: str, start_proxy: Callable[..., Any], recorder: tuple[str, Recorder], how: str
) -> None:
    url, upstream = recorder
    token = store.create(tmp_path / "tokens.json", "app", ["dev"]).reveal()
    proxy = await proxy_for(start_proxy, url, "required")
    header = {"x-api-key": token} if how == "x-api-key" else {"Authorization": f"Bearer {token}"}
    status, _, body = await post(proxy, header)
    assert status == 201, body
    (head,) = upstream.heads
    assert head["x-api-key"] == CANARY
    assert "Authorization" not in head and "authorization" not in head
    assert_secrets_absent([token], json.dumps(head).replace(CANARY, "KEY"), body)


async def test_required_and_optional_answer_unknown_revoked_and_expired_alike(
    tmp_path: Path, canary_env: str, start_proxy: Callable[..., Any], recorder: tuple[str, Recorder]
) -> None:
    url, upstream = recorder
    path = tmp_path / "tokens.json"
    long_ago = datetime.now(timezone.utc) - timedelta(days=3)
    expired = store.create(path, "expired", ["dev"], expires_days=1, now=long_ago).reveal()
    revoked = store.create(path, "revoked", ["dev"]).reveal()
    store.revoke(path, "revoked")
    unknown = "skp_" + "x" * 43
    for mode in ("required", "optional"):
        proxy = await proxy_for(start_proxy, url, mode)
        answers = []
        for token in (expired, revoked, unknown):
            status, headers, body = await post(proxy, {"x-api-key": token, "X-Request-Id": "same-id"})
            assert_error(401, "invalid_token", (status, headers, body))
            answers.append((status, body, sorted((k, v) for k, v in headers.items() if k != "Date")))
        assert answers[0] == answers[1] == answers[2]
    assert upstream.heads == []


async def test_optional_takes_a_token_when_present_and_the_header_otherwise(
    tmp_path: Path, canary_env: str, start_proxy: Callable[..., Any], recorder: tuple[str, Recorder]
) -> None:
    url, _ = recorder
    token = store.create(tmp_path / "tokens.json", "billing", ["dev"]).reveal()
    proxy = await proxy_for(start_proxy, url, "optional")
    assert (await post(proxy, {"X-User-Id": "alice"}))[0] == 201
    assert (await post(proxy, {"X-User-Id": "alice", "x-api-key": "placeholder"}))[0] == 201
    assert (await post(proxy, {"X-User-Id": "mallory", "x-api-key": token}))[0] == 201
    await eventually(lambda: len(audit_lines(proxy.audit_path)) == 3, "three audit lines")
    lines = audit_lines(proxy.audit_path)
    assert [(x["userId"], x["client"]) for x in lines] == [
        ("alice", None),
        ("alice", None),
        ("billing", "billing"),
    ]


async def test_a_token_for_another_environment_is_refused(
    tmp_path: Path, canary_env: str, start_proxy: Callable[..., Any], recorder: tuple[str, Recorder]
) -> None:
    url, upstream = recorder
    token = store.create(tmp_path / "tokens.json", "prod-only", ["production"]).reveal()
    proxy = await proxy_for(start_proxy, url, "optional")
    assert_error(403, "token_not_allowed", await post(proxy, {"x-api-key": token}))
    assert upstream.heads == []


async def test_two_different_tokens_are_refused(
    tmp_path: Path, canary_env: str, start_proxy: Callable[..., Any], recorder: tuple[str, Recorder]
) -> None:
    url, _ = recorder
    a = store.create(tmp_path / "tokens.json", "a", ["dev"]).reveal()
    b = store.create(tmp_path / "tokens.json", "b", ["dev"]).reveal()
    proxy = await proxy_for(start_proxy, url, "required")
    assert_error(401, "invalid_token", await post(proxy, {"x-api-key": a, "Authorization": f"Bearer {b}"}))
    assert (await post(proxy, {"x-api-key": a, "Authorization": f"Bearer {a}"}))[0] == 201


@pytest.mark.parametrize(
    ("binding", "header", "user"),
    [
        ({"user": "alice"}, "mallory", "alice"),
        ({"trust_user_header": True}, "end-user-7", "end-user-7"),
        ({}, "mallory", "app"),
    ],
)
async def test_identity_follows_the_token(
    tmp_path: Path,
    canary_env: str,
    start_proxy: Callable[..., Any],
    recorder: tuple[str, Recorder],
    binding: dict[str, Any],
    header: str,
    user: str,
) -> None:
    url, upstream = recorder
    token = store.create(tmp_path / "tokens.json", "app", ["dev"], **binding).reveal()
    # A per-user limit of 1/minute shows whose bucket a request is billed to.
    rules = "[[rate_limit.rules]]\nname = 'p'\npaths = ['/v1/predictions']\nper_user = '1/minute'\n"
    proxy = await proxy_for(start_proxy, url, "required", rules=rules)
    assert (await post(proxy, {"x-api-key": token, "X-User-Id": header}))[0] == 201
    assert (await post(proxy, {"x-api-key": token, "X-User-Id": header + "-other"}))[0] == (
        201 if binding.get("trust_user_header") else 429
    )
    await eventually(lambda: len(audit_lines(proxy.audit_path)) == 2, "two audit lines")
    first = audit_lines(proxy.audit_path)[0]
    assert (first["userId"], first["client"]) == (user, "app")
    assert "X-User-Id" not in upstream.heads[0]


async def test_refusals_come_before_rate_limits_and_are_counted(
    tmp_path: Path, canary_env: str, start_proxy: Callable[..., Any], recorder: tuple[str, Recorder]
) -> None:
    url, _ = recorder
    token = store.create(tmp_path / "tokens.json", "app", ["dev"], user="alice").reveal()
    rules = "[[rate_limit.rules]]\nname = 'p'\npaths = ['/v1/predictions']\nper_user = '1/minute'\n"
    proxy = await proxy_for(start_proxy, url, "required", rules=rules)
    for _ in range(3):  # without X-User-Id: the token's refusal, not missing_user
        assert_error(401, "invalid_token", await post(proxy, {"x-api-key": "skp_" + "z" * 43}))
    assert_error(401, "token_required", await post(proxy, {}))
    assert (await post(proxy, {"x-api-key": token}))[0] == 201  # no bucket was spent by the refusals
    _, _, metrics = await fetch(proxy.session, "GET", f"{proxy.url}/-/metrics")
    text = metrics.decode()
    assert 'skyproxy_client_refusals_total{environment="dev",reason="invalid_token"} 3.0' in text
    assert 'skyproxy_client_refusals_total{environment="dev",reason="token_required"} 1.0' in text


async def test_off_ignores_tokens_and_still_strips_them(
    tmp_path: Path, canary_env: str, start_proxy: Callable[..., Any], recorder: tuple[str, Recorder]
) -> None:
    url, upstream = recorder
    proxy = await proxy_for(start_proxy, url, "off")
    bogus = "skp_" + "q" * 43
    assert (await post(proxy, {"x-api-key": bogus, "X-User-Id": "alice"}))[0] == 201
    assert upstream.heads[0]["x-api-key"] == CANARY
    await eventually(lambda: len(audit_lines(proxy.audit_path)) == 1, "an audit line")
    assert audit_lines(proxy.audit_path)[0]["client"] is None


async def test_revoked_while_running_is_refused_within_two_seconds(
    tmp_path: Path, canary_env: str, start_proxy: Callable[..., Any], recorder: tuple[str, Recorder]
) -> None:
    url, _ = recorder
    token = store.create(tmp_path / "tokens.json", "app", ["dev"]).reveal()
    proxy = await proxy_for(start_proxy, url, "required")
    assert (await post(proxy, {"x-api-key": token}))[0] == 201
    config_path = tmp_path / "skyproxy.toml"
    revoked = await asyncio.to_thread(
        subprocess.run,
        [str(VENV_BIN / "skyproxy"), "token", "revoke", "app", "-c", str(config_path)],
        capture_output=True,
        timeout=60,
    )
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()

    async def refused() -> bool:
        return (await post(proxy, {"x-api-key": token}))[0] == 401

    await eventually(refused, "the revoked token refused", 2.0)
    assert time.monotonic() - started < 2.0
    # and a token made now works without a restart
    fresh = await asyncio.to_thread(store.create, tmp_path / "tokens.json", "new", ["dev"])

    async def accepted() -> bool:
        return (await post(proxy, {"x-api-key": fresh.reveal()}))[0] == 201

    await eventually(accepted, "the new token accepted", 2.0)


async def test_tokens_and_the_key_never_leak(
    tmp_path: Path, canary_env: str, start_proxy: Callable[..., Any], mock_upstream: tuple[str, Any]
) -> None:
    url, _ = mock_upstream
    path = tmp_path / "tokens.json"
    good = store.create(path, "good", ["dev"]).reveal()
    other = store.create(path, "other", ["production"]).reveal()
    expired = store.create(
        path, "old", ["dev"], expires_days=1, now=datetime.now(timezone.utc) - timedelta(days=2)
    )
    gone = store.create(path, "gone", ["dev"]).reveal()
    store.revoke(path, "gone")
    tokens = [good, other, expired.reveal(), gone, "skp_" + "u" * 43]
    captured: list[object] = []
    with all_logs() as records:
        proxy = await proxy_for(
            start_proxy, url, "required", rules="", extra="[pricing]\ntruefusion-pro = 0.01\n"
        )
        for token in tokens:
            for headers in ({"x-api-key": token}, {"Authorization": f"Bearer {token}"}):
                for path_ in ("/v1/predictions", "/v1/predict", "/v1/models", "/v1/nowhere"):
                    answer = await fetch(
                        proxy.session,
                        "POST",
                        f"{proxy.url}{path_}",
                        json=CREATE,
                        headers={**headers, "X-User-Id": "u"},
                    )
                    captured.append(answer)
        status, _, created = await post(proxy, {"x-api-key": good})
        assert status == 201
        pid = json.loads(created)["id"]
        captured.append(
            await fetch(
                proxy.session, "GET", f"{proxy.url}/v1/predictions/{pid}", headers={"x-api-key": good}
            )
        )
        for admin in ("/-/status", "/-/metrics", "/-/budgets"):
            captured.append(await fetch(proxy.session, "GET", f"{proxy.url}{admin}"))
        captured.append(repr(proxy.state.tokens.verify(good)))
        await eventually(lambda: audit_lines(proxy.audit_path), "audit lines written")
    assert_secrets_absent(
        tokens, *captured, log_text(records), files_text(proxy.audit_path, tmp_path / "tokens.json")
    )
