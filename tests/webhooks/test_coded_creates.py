"""Creates whose body comes with a Content-Encoding, while [webhooks] is on.

The upstream is a raw socket server, so the bytes it is sent are seen exactly as they
arrive. A coded body that asks for a webhook reaches it rewritten, in the coding the app
named; one the proxy cannot read is refused before the upstream is contacted, since its
webhook could reach the upstream unmoved.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import brotli
import pytest
from helpers import CANARY, Proxy, assert_no_canary, env_config
from helpers.http import assert_error, fetch
from helpers.raw_upstream import Peer, RawUpstream, answer

from skyproxy import codings
from skyproxy.webhooks.signing import new_secret

CODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "gzip, br": lambda body: brotli.compress(gzip.compress(body)),
}
APP_URL = "http://127.0.0.1:3000/hooks"


def hooks_table(tmp_path: Path) -> str:
    (tmp_path / "whsec").write_text(new_secret() + "\n")
    return '[webhooks]\nlisten = ["127.0.0.1:0"]\nsigning_secret = "file:whsec"\n'


def create_body(url: str | None = APP_URL) -> bytes:
    document: dict[str, object] = {"model": "truefusion-pro", "input": {"prompt": "a lighthouse"}}
    if url is not None:
        document["webhook"] = {"url": url, "events": ["completed"]}
    return json.dumps(document).encode()


async def created(peer: Peer) -> None:
    while await peer.request() is not None:
        body = b'{"id":"p1","status":"starting"}'
        await peer.send(answer(201, body, "Content-Type: application/json"))


async def post(proxy: Proxy, body: bytes, coding: str, framing: str = "length") -> tuple[int, object, bytes]:
    async def pieces() -> AsyncIterator[bytes]:
        for at in range(0, len(body), 50):
            yield body[at : at + 50]

    headers = {"X-User-Id": "a", "Content-Type": "application/json", "Content-Encoding": coding}
    data: object = body if framing == "length" else pieces()
    return await fetch(proxy.session, "POST", f"{proxy.url}/v1/predictions", data=data, headers=headers)


def posts(upstream: RawUpstream) -> list[object]:
    return [seen for seen in upstream.seen if seen.method == "POST"]


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("coding", list(CODERS))
async def test_a_coded_create_s_webhook_is_moved_and_the_body_keeps_its_coding(
    coding, framing, tmp_path, raw_server, start_proxy, canary_env
):
    upstream = await raw_server(created)
    proxy = await start_proxy(env_config(upstream.url, extra=hooks_table(tmp_path)))
    public = f"http://{proxy.server.webhooks.addresses()[0]}"
    status, _, raw = await post(proxy, CODERS[coding](create_body()), coding, framing)
    assert status == 201, raw
    [seen] = upstream.seen
    assert seen.headers["Content-Encoding"] == coding  # the head the app sent still describes it
    forwarded = json.loads(codings.decode_within(seen.body, codings.parse(coding) or (), 1 << 20))
    assert forwarded["webhook"]["url"].startswith(f"{public}/hooks/dev/")
    assert forwarded["webhook"]["events"] == ["completed"]
    assert {k: v for k, v in forwarded.items() if k != "webhook"} == {
        k: v for k, v in json.loads(create_body()).items() if k != "webhook"
    }
    assert APP_URL.encode() not in seen.body
    assert_no_canary(raw)


async def test_a_coded_create_without_a_webhook_goes_on_as_it_came(
    tmp_path, raw_server, start_proxy, canary_env
):
    upstream = await raw_server(created)
    proxy = await start_proxy(env_config(upstream.url, extra=hooks_table(tmp_path)))
    sent = gzip.compress(create_body(None))
    status, _, _ = await post(proxy, sent, "gzip")
    assert status == 201
    [seen] = upstream.seen
    assert seen.body == sent


@pytest.mark.parametrize(
    ("coding", "body", "status", "code"),
    [
        ("compress", b"\x1f\x9d\x90webhook", 415, "unsupported_content_encoding"),
        ("zstd", create_body(), 415, "unsupported_content_encoding"),
        ("gzip", create_body(), 400, "body_undecodable"),  # said gzip, sent plain: the URL is in it
        ("gzip", gzip.compress(create_body())[:-9], 400, "body_undecodable"),  # cut short
        ("br", gzip.compress(create_body()), 400, "body_undecodable"),
    ],
    ids=["compress", "zstd", "plain-said-gzip", "truncated", "wrong-coding"],
)
async def test_a_create_whose_body_cannot_be_read_is_refused_before_the_upstream(
    coding, body, status, code, tmp_path, raw_server, start_proxy, canary_env
):
    upstream = await raw_server(created)
    proxy = await start_proxy(env_config(upstream.url, extra=hooks_table(tmp_path)))
    answered = await post(proxy, body, coding)
    assert_error(status, code, answered)  # type: ignore[arg-type]
    assert posts(upstream) == []


async def test_a_coded_create_that_decodes_past_max_body_bytes_is_413(
    tmp_path, raw_server, start_proxy, canary_env
):
    upstream = await raw_server(created)
    config = env_config(upstream.url, server="max_body_bytes = 100000\n", extra=hooks_table(tmp_path))
    proxy = await start_proxy(config)
    bomb = gzip.compress(create_body()[:-1] + b', "pad": "' + b"x" * 10_000_000 + b'"}')
    assert len(bomb) < 100_000  # small on the wire, far past the bound decoded
    answered = await post(proxy, bomb, "gzip", "chunked")
    assert_error(413, "body_too_large", answered)  # type: ignore[arg-type]
    assert posts(upstream) == []


async def test_a_coded_create_s_webhook_outside_allowed_targets_is_400(
    tmp_path, raw_server, start_proxy, canary_env
):
    upstream = await raw_server(created)
    proxy = await start_proxy(env_config(upstream.url, extra=hooks_table(tmp_path)))
    body = gzip.compress(create_body("http://169.254.169.254/latest/meta-data"))
    assert_error(400, "webhook_target_not_allowed", await post(proxy, body, "gzip"))  # type: ignore[arg-type]
    assert posts(upstream) == []


@pytest.mark.parametrize("coding", ["identity", "gzip"])
async def test_with_the_audit_off_a_create_s_webhook_is_still_moved(
    coding, tmp_path, raw_server, start_proxy, canary_env
):
    upstream = await raw_server(created)
    # `extra` lands inside [audit] first: it is switched off there.
    proxy = await start_proxy(env_config(upstream.url, extra="enabled = false\n" + hooks_table(tmp_path)))
    body = create_body() if coding == "identity" else gzip.compress(create_body())
    status, _, _ = await post(proxy, body, coding)
    assert status == 201
    [seen] = upstream.seen
    plain = seen.body if coding == "identity" else gzip.decompress(seen.body)
    assert APP_URL not in json.loads(plain)["webhook"]["url"]
    assert CANARY.encode() not in plain


@pytest.mark.parametrize("hooks", [False, True])
async def test_a_coded_body_goes_upstream_as_the_bytes_its_coding_describes(
    hooks, tmp_path, raw_server, start_proxy, canary_env
):
    upstream = await raw_server(created)
    proxy = await start_proxy(env_config(upstream.url, extra=hooks_table(tmp_path) if hooks else ""))
    for path in ("/v1/predictions", "/v1/chat/completions"):
        sent = gzip.compress(b'{"model": "truefusion-pro", "input": {}}')
        headers = {"X-User-Id": "a", "Content-Type": "application/json", "Content-Encoding": "gzip"}
        status, _, _ = await fetch(proxy.session, "POST", proxy.url + path, data=sent, headers=headers)
        assert status == 201
        seen = upstream.seen[-1]
        assert (seen.target, seen.headers["Content-Encoding"], seen.body) == (path, "gzip", sent)
