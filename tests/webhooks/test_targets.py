"""The SSRF guard: targets are parsed and compared part by part, never as text prefixes."""

from __future__ import annotations

import pytest

from skyproxy.config import TargetPattern
from skyproxy.config.settings import DEFAULT_ALLOWED_TARGETS
from skyproxy.webhooks.targets import allowed, origin_of


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:3000/hooks",
        "http://localhost:8080/",
        "http://LOCALHOST:8080/x",
        "http://[::1]:9000/hooks",
        "http://[0:0:0:0:0:0:0:1]:9000/hooks",
        "http://127.0.0.1/",
    ],
)
def test_the_default_allows_loopback_on_any_port(url: str) -> None:
    assert allowed(url, DEFAULT_ALLOWED_TARGETS)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:80@evil.example/",
        "http://evil.example/?x=http://127.0.0.1:1",
        "https://127.0.0.1:3000/",  # another scheme
        "http://127.0.0.2:3000/",
        "http://169.254.169.254/latest/meta-data",
        "http://localhost.evil.example:80/",
        "ftp://127.0.0.1/",
        "file:///etc/passwd",
        "http://127.0.0.1:99999/",
        "http://127.0.0.1:3000\\@evil.example/",
        "http://127.0.0.1:3000/\nHost: x",
        "http:///nohost",
        "",
        "not a url",
    ],
)
def test_anything_else_is_refused(url: str) -> None:
    assert not allowed(url, DEFAULT_ALLOWED_TARGETS)


def test_a_path_prefix_is_a_whole_segment() -> None:
    patterns = [TargetPattern("https", "app.example.com", 443, "/hooks")]
    assert allowed("https://app.example.com/hooks", patterns)
    assert allowed("https://app.example.com:443/hooks/skytells?x=1", patterns)
    assert not allowed("https://app.example.com/hooksevil", patterns)
    assert not allowed("https://app.example.com/", patterns)
    assert not allowed("https://app.example.com:8443/hooks", patterns)


def test_origins_count_concurrency_per_host_and_port() -> None:
    assert origin_of("http://LocalHost:80/a") == origin_of("http://localhost/b") == "http://localhost:80"
    assert origin_of("http://[::1]:9/") == "http://[::1]:9"
