"""Script calls as Redis protocol (RESP) bytes, built from pieces a caller can keep.

redis-py's `pack_command` encodes every argument on every call (an encoder that tests
each value's type, a `repr` per number, a join per argument). A rate check's keys and
rates are the same from one request to the next, so `RedisRates` keeps each bucket's
encoded key and arguments and joins them. The encoding is redis-py's: bytes as they
are, text as UTF-8, numbers by `repr`; `tests/cluster/test_cluster_resp.py` checks the
bytes against `pack_command`.

A call is a `Tail`: the script's key count, keys and arguments, encoded, with how many
there are. `evalsha` and `eval` put the command in front of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["Arg", "Tail", "bulk", "count", "eval_", "evalsha", "tail"]

Arg = bytes | str | int | float


class Tail(NamedTuple):
    """`items` encoded items: the number of keys, the keys, then the arguments."""

    items: int
    data: bytes


def bulk(value: Arg) -> bytes:
    """One argument as a RESP bulk string."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        data = repr(value).encode()
    else:  # as redis-py's encoder: a bool or anything else is a mistake, not a value
        raise TypeError(f"cannot send a {type(value).__name__} to Redis")
    return b"$%d\r\n%b\r\n" % (len(data), data)


_COUNTS = tuple(bulk(n) for n in range(64))


def count(n: int) -> bytes:
    """A small count (of keys, of buckets) as a bulk string."""
    return _COUNTS[n] if 0 <= n < len(_COUNTS) else bulk(n)


def tail(keys: Sequence[str], args: Sequence[Arg]) -> Tail:
    parts = [count(len(keys))]
    parts += map(bulk, keys)
    parts += map(bulk, args)
    return Tail(len(parts), b"".join(parts))


def evalsha(sha: bytes, call: Tail) -> bytes:
    """EVALSHA of a script by its SHA-1 (40 hex digits, as bytes)."""
    return b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%b\r\n%b" % (call.items + 2, len(sha), sha, call.data)


def eval_(source: bytes, call: Tail) -> bytes:
    """EVAL with the script's source: for a Redis that does not have it cached."""
    return b"*%d\r\n$4\r\nEVAL\r\n$%d\r\n%b\r\n%b" % (call.items + 2, len(source), source, call.data)
