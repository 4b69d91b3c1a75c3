"""The script calls' encoding: byte for byte what redis-py's `pack_command` sends."""

from __future__ import annotations

import hashlib

import pytest
from redis.asyncio import Connection

from skyproxy.cluster import resp

SOURCE = "return {KEYS[1], ARGV[1]}"
SHA = hashlib.sha1(SOURCE.encode()).hexdigest()
CASES: list[tuple[list[str], list[resp.Arg]]] = [
    ([], []),
    (["k"], []),
    (["skyproxy:rate:dev:r%3A1:5/60:user:é"], [1, 5, 60.0, 0]),
    (["a", "b"], [-3, 0.1, 1e-7, 1e300, 2**70, "", "text é", b"\x00\r\n$bytes", float("inf")]),
]


@pytest.mark.parametrize(("keys", "args"), CASES)
def test_evalsha_and_eval_are_encoded_as_redis_py_encodes_them(keys: list[str], args: list[resp.Arg]) -> None:
    packer = Connection()
    call = resp.tail(keys, args)
    assert resp.evalsha(SHA.encode(), call) == b"".join(
        packer.pack_command("EVALSHA", SHA, len(keys), *keys, *args)
    )
    assert resp.eval_(SOURCE.encode(), call) == b"".join(
        packer.pack_command("EVAL", SOURCE, len(keys), *keys, *args)
    )


@pytest.mark.parametrize("value", [True, None, [1], 1j])
def test_a_value_redis_cannot_hold_is_refused(value: object) -> None:
    with pytest.raises(TypeError):
        resp.bulk(value)  # type: ignore[arg-type]
