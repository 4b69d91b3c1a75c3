"""A user id that is not UTF-8 is hostile input like any other: under [cluster] it gets
its own rate bucket and budget subject on Redis, not a 500 from encoding a key.

aiohttp gives header bytes that are not UTF-8 as lone surrogates, which do not encode;
every Redis key a user id reaches (a rate bucket, a budget subject) must still be sent.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from helpers import Daemon
from helpers.daemon import eventually
from helpers.redis_server import RedisServer

RULES = (
    '[rate_limit]\nuser_header = "X-User-Id"\n'
    '[[rate_limit.rules]]\nname = "predictions"\nmethods = ["POST"]\npaths = ["/v1/predictions"]\n'
    'per_user = "100/minute"\n'
    '[pricing]\ntruefusion-pro = 0.3\n[[budgets]]\nname = "daily"\nper = "user"\nusd = 1.0\nperiod = "day"\n'
)


def exchange(port: int, method: str, path: str, user: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One request over a raw socket, so that the header carries exactly these bytes."""
    head = (
        b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        b"X-User-Id: %s\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
        % (method.encode(), path.encode(), port, user, len(body))
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_a_user_id_that_is_not_utf8_is_limited_and_billed_on_redis(
    redis_server: RedisServer, start_replicas: Callable[..., list[Daemon]]
) -> None:
    (replica,) = start_replicas(redis_server.url, count=1, rules=RULES)
    port = urlsplit(replica.url).port
    assert port is not None
    create = b'{"model":"truefusion-pro","input":{"prompt":"a cat"}}'
    status, body = exchange(port, "POST", "/v1/predictions", b"caf\xff", create)
    assert status in (200, 201), body
    status, body = exchange(port, "POST", "/v1/predictions", b"caf\xc3\xa9", create)  # a neighbour
    assert status in (200, 201), body
    spent: list[tuple[str, float]] = []

    def billed() -> bool:  # the spend reaches Redis a moment after the answer
        status, body = exchange(port, "GET", "/-/budgets", b"x")
        assert status == 200, body
        rows: list[dict[str, Any]] = json.loads(body)["budgets"]
        spent[:] = sorted((row["subject"], row["spent_usd"]) for row in rows)
        return len(spent) == 2 and all(usd == 0.3 for _, usd in spent)

    # Two subjects, each billed its own create: the bytes that are not UTF-8 are not
    # taken for the neighbour's name, and the view finds the key it names.
    await eventually(billed, "both creates billed on Redis")
    assert "café" in [subject for subject, _ in spent]
    assert "Traceback" not in replica.stderr()
