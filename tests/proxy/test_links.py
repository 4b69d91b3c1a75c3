"""Link rewriting on answer bodies: in place or parsed, the same links move and nothing else."""

from __future__ import annotations

import json

import orjson
import pytest

from skyproxy.proxy import links

UP = "http://127.0.0.1:4567"
PROXY = "http://localhost:8787"


def rewrite(body: bytes, upstream: str, proxy: str) -> bytes:
    return links.Rewrite(upstream, proxy).body(body)


def location(value: str, upstream: str, proxy: str) -> str:
    return links.Rewrite(upstream, proxy).location(value)


def prediction(pid: str = "p1", origin: str = UP, **extra: object) -> dict[str, object]:
    return {
        "id": pid,
        "status": "processing",
        "input": {"prompt": "a lighthouse"},
        "urls": {
            "get": f"{origin}/v1/predictions/{pid}",
            "cancel": f"{origin}/v1/predictions/{pid}/cancel",
            "stream": f"{origin}/v1/predictions/{pid}/stream",
        },
        **extra,
    }


def moved(document: object) -> object:
    """What the rewrite must produce: every urls.* naming UP now names PROXY."""
    text = json.dumps(document)
    return json.loads(text.replace(f'"{UP}/', f'"{PROXY}/'))


@pytest.mark.parametrize(
    "dump",
    [
        lambda d: orjson.dumps(d),  # compact, as most servers write it
        lambda d: json.dumps(d).encode(),  # a space after each colon and comma
        lambda d: json.dumps(d, indent=2).encode(),  # pretty: parsed
    ],
    ids=["compact", "spaced", "indented"],
)
def test_a_prediction_s_links_move_and_nothing_else_changes(dump: object) -> None:
    body = dump(prediction())  # type: ignore[operator]
    out = rewrite(body, UP, PROXY)
    assert orjson.loads(out) == moved(prediction())
    assert UP.encode() not in out


@pytest.mark.parametrize("dump", [orjson.dumps, lambda d: json.dumps(d).encode()], ids=["compact", "spaced"])
def test_the_common_answer_keeps_every_other_byte(dump: object) -> None:
    body = dump(prediction())  # type: ignore[operator]
    assert rewrite(body, UP, PROXY) == body.replace(UP.encode(), PROXY.encode())


def test_the_upstream_elsewhere_in_the_body_is_left_alone() -> None:
    echoed = prediction(input={"image": f"{UP}/v1/files/cat.png"}, logs=f"fetched {UP}/x")
    for body in (orjson.dumps(echoed), json.dumps(echoed).encode()):
        out = orjson.loads(rewrite(body, UP, PROXY))
        assert out["input"] == {"image": f"{UP}/v1/files/cat.png"}
        assert out["logs"] == f"fetched {UP}/x"
        assert out["urls"] == moved(prediction())["urls"]  # type: ignore[index]


def test_lists_of_predictions() -> None:
    page = {"data": [prediction("a"), prediction("b")], "next": None}
    for body in (orjson.dumps(page), json.dumps(page).encode(), orjson.dumps([prediction("a")])):
        document = orjson.loads(body)
        assert orjson.loads(rewrite(body, UP, PROXY)) == moved(document)


def test_another_port_with_the_same_prefix_is_not_the_upstream() -> None:
    document = prediction()
    document["urls"]["web"] = "http://127.0.0.1:45678/p/p1"  # type: ignore[index]
    body = orjson.dumps(document)
    out = orjson.loads(rewrite(body, UP, PROXY))
    assert out["urls"]["web"] == "http://127.0.0.1:45678/p/p1"
    assert out["urls"]["get"] == f"{PROXY}/v1/predictions/p1"


@pytest.mark.parametrize("value", [UP, f"{UP}?x=1", f"{UP}#top"])
def test_links_without_a_path(value: str) -> None:
    document = prediction()
    document["urls"]["home"] = value  # type: ignore[index]
    out = orjson.loads(rewrite(orjson.dumps(document), UP, PROXY))
    assert out["urls"]["home"] == PROXY + value[len(UP) :]
    assert out["urls"]["get"] == f"{PROXY}/v1/predictions/p1"


def test_a_brace_inside_a_link() -> None:
    document = prediction()
    document["urls"] = {"get": f"{UP}/v1/x?q={{}}", "cancel": f"{UP}/v1/x/cancel"}
    out = orjson.loads(rewrite(orjson.dumps(document), UP, PROXY))
    assert out["urls"] == {"get": f"{PROXY}/v1/x?q={{}}", "cancel": f"{PROXY}/v1/x/cancel"}


def test_a_proxy_origin_that_needs_escaping_stays_valid_json() -> None:
    odd = 'http://[::1]"\\x'  # a Host header the guard lets through by its bracketed name
    out = orjson.loads(rewrite(orjson.dumps(prediction()), UP, odd))
    assert out["urls"]["get"] == f"{odd}/v1/predictions/p1"


@pytest.mark.parametrize(
    "body",
    [
        f"see {UP}/v1/predictions/p1".encode(),  # not JSON
        b'{"id":"p1","urls":{"get":"' + UP.encode() + b'/v1/x"',  # cut short: not JSON
        b'<p>"urls":{"get":"' + UP.encode() + b'/v1/x"}</p>',  # HTML quoting JSON
        orjson.dumps({"urls": {"get": "https://elsewhere.example/v1/x"}}),  # not the upstream
        orjson.dumps(prediction(origin="http:\\/\\/127.0.0.1:4567")),  # escaped slashes
    ],
)
def test_bodies_it_cannot_see_as_links_to_the_upstream_pass_unchanged(body: bytes) -> None:
    assert rewrite(body, UP, PROXY) is body


def test_answers_over_the_limit_pass_unchanged() -> None:
    document = prediction(logs="x" * links.MAX_BODY)
    body = orjson.dumps(document)
    assert rewrite(body, UP, PROXY) is body


def test_location() -> None:
    assert location(f"{UP}/v1/predictions/p1", UP, PROXY) == f"{PROXY}/v1/predictions/p1"
    assert location("http://127.0.0.1:45678/x", UP, PROXY) == "http://127.0.0.1:45678/x"
    assert location("/v1/predictions/p1", UP, PROXY) == "/v1/predictions/p1"


def test_one_rewrite_per_upstream_and_host_and_a_bounded_memory() -> None:
    first = links.rewrite_for(UP, "localhost:8787")
    assert first.proxy == PROXY
    assert links.rewrite_for(UP, "localhost:8787") is first
    assert links.rewrite_for(UP, "127.0.0.1:8787").proxy == "http://127.0.0.1:8787"
    for n in range(3 * links._KEPT):
        links.rewrite_for(UP, f"[::1]{n}")
    assert len(links._rewrites) <= links._KEPT
