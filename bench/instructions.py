"""CPU instructions per proxied request, counted by callgrind: the deterministic measure.

Requests per second on a shared VM move by a third from one run to the next; callgrind
counts the instructions a process executes, the same on a busy machine as on a quiet
one. For each target the runner starts the proxy under callgrind with counting off,
warms it up, counts exactly N creates, dumps, counts N gets, dumps, and divides. The
count covers every thread of the process (skyproxy's audit writer included) in user
space; it does not see the kernel, cache misses or waiting, so it ranks code, not
machines.

The load generator, run on the other core:

    python -m bench.instructions load --url http://127.0.0.1:8801 --kind create --requests 2000

Creates POST /v1/predictions; gets poll GET /v1/predictions/ID over a fixed set of ids.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

BODY = b'{"model":"truefusion-pro","input":{"prompt":"test"}}'
USERS = 100
POLLED = [str(uuid.UUID(int=n + 1)) for n in range(USERS)]  # the ids the gets ask for
_TOTALS = re.compile(rb"^totals:\s+(\d+)", re.MULTILINE)


def available() -> str | None:
    """None when callgrind can run here, else why not."""
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        return "valgrind is not installed (apt-get install valgrind)"
    return None


def wrap(out_file: Path) -> list[str]:
    """The command prefix that runs a target under callgrind with counting off."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_file}"]


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=60)


def dumped_total(out_file: Path, index: int = 0) -> int:
    """Instructions in dump `index` (`callgrind_control -d`, counted since the dump before)."""
    numbered = (p for p in out_file.parent.glob(out_file.name + ".*") if p.suffix[1:].isdigit())
    dumps = sorted(numbered, key=lambda p: int(p.suffix[1:]))
    if len(dumps) <= index:
        raise RuntimeError(f"callgrind wrote {len(dumps)} dump(s) next to {out_file}, not {index + 1}")
    found = _TOTALS.search(dumps[index].read_bytes())
    if found is None:
        raise RuntimeError(f"no totals line in {dumps[index]}")
    return int(found.group(1))


async def load(url: str, requests: int, concurrency: int, kind: str = "create") -> int:
    """Sends `requests` creates or gets with `concurrency` workers; returns how many failed."""
    import aiohttp

    left = requests
    failed = 0
    token = os.environ.get("SKYPROXY_BENCH_TOKEN")  # set for the tokens + budgets target
    extra = {"x-api-key": token} if token else {}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left, failed
        while left > 0:
            left -= 1
            user = f"bench-user-{left % USERS}"
            if kind == "create":
                headers = {"Content-Type": "application/json", "X-User-Id": user, **extra}
                request = session.post(f"{url}/v1/predictions", data=BODY, headers=headers)
            else:
                request = session.get(
                    f"{url}/v1/predictions/{POLLED[left % USERS]}", headers={"X-User-Id": user, **extra}
                )
            async with request as response:
                await response.read()
                failed += response.status != (201 if kind == "create" else 200)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("load", help="send N creates or gets and exit")
    run.add_argument("--url", required=True, help="the proxy's base URL")
    run.add_argument("--kind", choices=("create", "get"), default="create")
    run.add_argument("--requests", type=int, default=2000)
    run.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    failed = asyncio.run(load(args.url, args.requests, args.concurrency, args.kind))
    if failed:
        print(f"{failed} of {args.requests} requests failed")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
