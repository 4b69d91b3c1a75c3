"""The outbound head: byte-exact header lines, less what never travels, plus the key.

The whole path is tested through a real proxy in test_forwarding.py; these pin the
rules of `outbound_head` itself, one at a time.
"""

from __future__ import annotations

import pytest

from skyproxy.proxy.headers import outbound_head

KEY = b"sk-test-key"
USER_HEADER = b"x-user-id"


def lines(raw: list[tuple[bytes, bytes]]) -> list[bytes]:
    head = bytes(outbound_head(tuple(raw), KEY, "rid-1", USER_HEADER))
    assert head.endswith(b"\r\n")
    return head[:-2].split(b"\r\n")


def test_kept_lines_pass_byte_for_byte_and_the_key_and_request_id_follow() -> None:
    raw = [(b"X-Odd-Case", b"Value  with  spaces"), (b"content-type", b"application/json")]
    assert lines(raw) == [
        b"X-Odd-Case: Value  with  spaces",
        b"content-type: application/json",
        b"Accept-Encoding: identity",
        b"x-api-key: sk-test-key",
        b"X-Request-Id: rid-1",
    ]


@pytest.mark.parametrize(
    "name",
    [b"Host", b"X-API-Key", b"Authorization", b"Cookie", b"Content-Length", b"Expect", b"X-Request-Id",
     b"Transfer-Encoding", b"TE", b"Upgrade", b"Keep-Alive", b"X-User-Id"],
)  # fmt: skip
def test_credentials_framing_hop_by_hop_and_the_user_header_are_dropped(name: bytes) -> None:
    assert lines([(name, b"v"), (b"X-Kept", b"1")])[0] == b"X-Kept: 1"
    assert len(lines([(name, b"v")])) == 3  # identity, the key and the request id only


def test_headers_the_connection_header_names_are_dropped() -> None:
    raw = [(b"Connection", b"close, X-Hop"), (b"x-hop", b"1"), (b"X-Kept", b"2")]
    assert lines(raw)[0] == b"X-Kept: 2"
    assert len(lines(raw)) == 4


@pytest.mark.parametrize(
    "accept",
    [[], [b"gzip, deflate, br"], [b"br;q=1.0, GZIP;q=0.5"], [b"identity"], [b"br", b"deflate"], [b"*"]],
)
def test_the_upstream_is_asked_for_identity_whatever_the_client_accepts(accept: list[bytes]) -> None:
    raw = [(b"Accept-Encoding", value) for value in accept]
    got = [line for line in lines(raw) if line.lower().startswith(b"accept-encoding")]
    assert got == [b"Accept-Encoding: identity"]
