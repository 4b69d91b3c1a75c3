"""Audit writer throughput and event-loop stalls. Standalone; never run by the tests.

An asyncio loop runs a ticker that sleeps 1 ms at a time and records how late each
wake-up is, while another task submits N records from the loop, yielding every few
records as request handlers would. Lines/s counts from the first submit until close()
has put every line on disk; close runs in a thread, so the ticker keeps measuring
while the queue drains.

The same loop is then run with submit() replaced by a no-op: its stalls are the
machine's own noise (other processes, the scheduler), which the audit's figures
include, so compare the two rather than reading the audit's alone.

    .venv/bin/python bench/audit_throughput.py [N]

Targets: >= 50,000 lines/s and a p99 stall <= 5 ms.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from skyproxy.audit.record import AuditRecord
from skyproxy.audit.writer import AuditWriter
from skyproxy.config import AuditSettings

TICK = 0.001
YIELD_EVERY = 20  # records submitted between yields: about 0.1-0.2 ms of loop time


def _record(i: int) -> AuditRecord:
    return AuditRecord(
        environment="production",
        userId=f"user-{i % 1000}",
        predictionId=f"pred_{i:012d}",
        model="truefusion-pro",
        status="created",
        httpStatus=201,
        latencyMs=123.4,
        costUsd=0.03,
        ipAddress="127.0.0.1",
        requestId=f"{i:032x}",
        keyFingerprint="sk-…ab12",
        method="POST",
        path="/v1/predictions",
    )


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # nearest rank
    return ordered[int(rank) - 1]


async def _load(records: list[AuditRecord], submit: Callable[[AuditRecord], bool]) -> int:
    refused = 0
    for i, record in enumerate(records):
        if not submit(record):
            refused += 1
        if i % YIELD_EVERY == YIELD_EVERY - 1:
            await asyncio.sleep(0)
    return refused


async def _measure(n: int, folder: Path | None) -> dict[str, float | int]:
    """One run; with no folder, submit is a no-op and only the stalls count."""
    # Records are built before the clock starts: building them is the handler's cost,
    # serialising them (inside submit) is the audit's.
    records = [_record(i) for i in range(n)]
    writer = None
    if folder is not None:
        writer = AuditWriter(AuditSettings(path=folder / "audit.jsonl"))
        writer.start()
    lateness: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(TICK)
            lateness.append((time.perf_counter() - start - TICK) * 1000)

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)  # let the ticker settle before the load starts
    began = time.perf_counter()
    refused = await _load(records, writer.submit if writer else lambda record: True)
    submitted = time.perf_counter()
    unwritten = await writer.aclose(60.0) if writer else 0
    finished = time.perf_counter()
    done.set()
    await ticking
    stalls = {
        "stall_p50_ms": round(_percentile(lateness, 50), 3),
        "stall_p99_ms": round(_percentile(lateness, 99), 3),
        "stall_max_ms": round(max(lateness), 3),
    }
    if folder is None:
        return stalls
    lines = 0
    for file in folder.glob("audit.jsonl*"):  # the default settings rotate at 10 MB
        with file.open("rb") as f:
            lines += sum(1 for _ in f)
    return {
        "records": n,
        "lines_on_disk": lines,
        "refused": refused,
        "unwritten": unwritten,
        "submit_seconds": round(submitted - began, 3),
        "total_seconds": round(finished - began, 3),
        "lines_per_second": round(lines / (finished - began)),
        "ticks": len(lateness),
        **stalls,
    }


def run(n: int = 200_000) -> dict[str, float | int]:
    with tempfile.TemporaryDirectory(prefix="skyproxy-audit-bench-") as folder:
        result = asyncio.run(_measure(n, Path(folder)))
    baseline = asyncio.run(_measure(n, None))
    result.update({f"baseline_{name}": value for name, value in baseline.items()})
    return result


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000), indent=2))
