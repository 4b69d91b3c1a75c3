"""`SharedLimits` on a real redis-server answers as the local `Limits` does, request for
request: the same admissions, refusals, messages and RateLimit headers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers.redis_server import RedisServer

from skyproxy import config
from skyproxy.proxy.limits import Limits
from skyproxy.proxy.shared_limits import SharedLimits

RULES = """
[environments.dev]
listen = ["127.0.0.1:0"]
upstream = "mock"
key = "env:SKYPROXY_TEST_KEY"

[rate_limit]
user_header = "X-User-Id"

[[rate_limit.rules]]
name = "burst"
methods = ["POST"]
paths = ["/v1/predictions"]
per_user = "3/minute"
per_environment = "5/hour"

[[rate_limit.rules]]
name = "daily"
methods = ["POST"]
paths = ["/v1/*"]
per_user = "4/day"

[[rate_limit.rules]]
name = "shared"
methods = ["GET"]
paths = ["/v1/models"]
per_environment = "2/hour"
"""

# (method, path, user): alice reaches her burst limit, the environment its hourly one,
# bob his daily one through the wildcard rule, and GETs the environment-only rule.
REQUESTS = [
    *[("POST", "/v1/predictions", "alice")] * 4,
    *[("POST", "/v1/predictions", "bob")] * 3,
    *[("POST", "/v1/predict", "bob")] * 3,
    ("POST", "/v1/predictions", "carol"),
    *[("GET", "/v1/models", "dave")] * 3,
    ("GET", "/v1/other", "dave"),
]


async def test_shared_limits_answer_as_the_local_limits_do(
    tmp_path: Path, redis_server: RedisServer, make_node: Callable[..., Any]
) -> None:
    path = tmp_path / "skyproxy.toml"
    path.write_text(RULES)
    settings = config.load(path, {"SKYPROXY_TEST_KEY": "k" * 32})
    node = await make_node(redis_server.url)
    local = Limits(settings.environments)
    shared = SharedLimits(settings.environments, node.rates)
    seen = []
    for method, where, user in REQUESTS:
        assert shared.is_limited("dev", method, where) == local.is_limited("dev", method, where)
        expected = await local.check("dev", method, where, user)
        got = await shared.check("dev", method, where, user)
        assert (got and got._replace(headers=dict(got.headers))) == (
            expected and expected._replace(headers=dict(expected.headers))
        ), (method, where, user)
        seen.append(None if got is None else (got.allowed, got.scope, got.rule))
    # The sequence went through every case.
    assert (False, "user", "burst") in seen
    assert (False, "environment", "burst") in seen
    assert (False, "user", "daily") in seen
    assert (False, "environment", "shared") in seen
    assert None in seen
