"""Budgets enforced: exact limits under parallel creates, period resets, the spend rule,
restart from the audit files (a SIGKILLed writer included), no budget no refusal."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import pytest
from helpers.daemon import eventually
from multidict import CIMultiDict

from skyproxy.audit.summary import summarize
from skyproxy.budgets.enforce import NO_HOLD, Budgets, Exceeded, Hold
from skyproxy.config import Budget
from skyproxy.proxy.exchange import Call


class Clock:
    def __init__(self, when: str) -> None:
        self.now = at(when)

    def __call__(self) -> float:
        return self.now


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


DAILY = Budget("daily", "user", 1.0, "day")


def record(budgets: Budgets, status: str, pid: str | None, cost: float | None, user: str = "alice") -> None:
    budgets.record(budgets.clock(), "dev", user, None, status, pid, cost)


def spent(budgets: Budgets, budget: str, subject: str | None) -> float:
    for row in budgets.snapshot():
        if row["budget"] == budget and row["subject"] == subject:
            return float(row["spent_usd"])
    return 0.0


async def test_twenty_parallel_creates_stop_exactly_at_the_limit() -> None:
    budgets = Budgets((DAILY,), Clock("2026-11-26T10:00:00"))
    answers: list[Hold | Exceeded] = []

    async def create(n: int) -> None:
        answer = budgets.admit("dev", "alice", None, 0.1)
        answers.append(answer)
        if isinstance(answer, Hold):
            try:
                await asyncio.sleep(0)  # every create is in flight before any is recorded
                record(budgets, "created", f"p{n}", 0.1)
            finally:
                answer.release()

    await asyncio.gather(*(create(n) for n in range(20)))
    assert sum(isinstance(a, Hold) for a in answers) == 10
    refused = [a for a in answers if isinstance(a, Exceeded)]
    assert len(refused) == 10 and all(a.budget == "daily" for a in refused)
    assert spent(budgets, "daily", "alice") == 1.0
    assert budgets.snapshot()[0]["reserved_usd"] == 0.0
    assert isinstance(budgets.admit("dev", "alice", None, 0.1), Exceeded)
    assert isinstance(budgets.admit("dev", "alice", None, 0.0), Hold)  # exactly at the limit is not over it
    assert isinstance(budgets.admit("dev", "bob", None, 0.1), Hold)  # per user


def test_reservations_count_until_released() -> None:
    budgets = Budgets((DAILY,), Clock("2026-11-26T10:00:00"))
    holds = [budgets.admit("dev", "alice", None, 0.4) for _ in range(2)]
    assert all(isinstance(h, Hold) for h in holds)
    refused = budgets.admit("dev", "alice", None, 0.4)
    assert isinstance(refused, Exceeded)
    assert (refused.spent_usd, refused.reserved_usd, refused.limit_usd) == (0.0, 0.8, 1.0)
    for hold in holds:  # the creates failed: nothing spent, everything given back
        assert isinstance(hold, Hold)
        hold.release()
    assert budgets.snapshot() == []
    assert isinstance(budgets.admit("dev", "alice", None, 1.0), Hold)


def test_a_negative_cost_on_a_created_line_is_taken_back_exactly() -> None:
    """A hostile upstream's create answer may bill a negative amount: whatever it counted as,
    the terminal cost replaces exactly that, as `audit summary` has it."""
    budgets = Budgets((DAILY,), Clock("2026-11-26T10:00:00"))
    record(budgets, "created", "p1", -0.5)
    record(budgets, "succeeded", "p1", 0.2)
    assert spent(budgets, "daily", "alice") == 0.2


def test_an_exchange_gives_its_reservation_back_once_however_often_it_releases() -> None:
    """Holds of one amount in one account are shared, so the exchange releases its own once."""
    budgets = Budgets((DAILY,), Clock("2026-11-26T10:00:00"))
    calls = []
    for _ in range(2):
        call = Call(cast(Any, None), cast(Any, None), cast(Any, None), "req", CIMultiDict(), "create")
        held = budgets.admit("dev", "alice", None, 0.4)
        assert isinstance(held, Hold)
        call.hold = held
        calls.append(call)
    assert calls[0].hold is calls[1].hold
    calls[0].release()
    calls[0].release()  # a second release of one exchange gives nothing more back
    assert [row["reserved_usd"] for row in budgets.snapshot()] == [0.4]
    assert isinstance(budgets.admit("dev", "alice", None, 0.61), Exceeded)
    calls[1].release()
    assert budgets.snapshot() == []


def test_a_subject_whose_spend_came_to_nothing_is_still_shown() -> None:
    """`budget show` lists every subject with spend lines in the window, at $0 too; one that
    only reserved and gave it back has no row."""
    budgets = Budgets((DAILY,), Clock("2026-11-26T10:00:00"))
    held = budgets.admit("dev", "alice", None, 0.5)
    assert isinstance(held, Hold)
    record(budgets, "created", "p1", 0.5)
    record(budgets, "failed", "p1", 0.0)  # the prediction failed: it cost nothing
    held.release()
    passing = budgets.admit("dev", "bob", None, 0.5)
    assert isinstance(passing, Hold)
    passing.release()  # the upstream was down: no line
    expected = [("alice", 0.0, 0.0)]
    assert [(r["subject"], r["spent_usd"], r["reserved_usd"]) for r in budgets.snapshot()] == expected
    budgets.reconfigure((Budget("daily", "user", 2.0, "day"),))  # recounted from the ledger
    assert [(r["subject"], r["spent_usd"], r["reserved_usd"]) for r in budgets.snapshot()] == expected


def test_the_terminal_cost_replaces_the_estimate_and_unpriced_models_count_when_known() -> None:
    budgets = Budgets((DAILY,), Clock("2026-11-26T10:00:00"))
    record(budgets, "created", "p1", 0.5)
    record(budgets, "succeeded", "p1", 0.2)
    assert spent(budgets, "daily", "alice") == 0.2
    record(budgets, "created", "p2", None)  # a model without a price: estimated at 0
    assert isinstance(budgets.admit("dev", "alice", None, 0.0), Hold)
    record(budgets, "succeeded", "p2", 0.9)
    assert spent(budgets, "daily", "alice") == pytest.approx(1.1)
    assert isinstance(budgets.admit("dev", "alice", None, 0.0), Exceeded)
    record(budgets, "failed", None, None)  # a failed create without an id costs nothing
    record(budgets, "rejected", None, None)
    assert spent(budgets, "daily", "alice") == pytest.approx(1.1)


def test_a_period_boundary_resets_spend_with_no_sleeping() -> None:
    clock = Clock("2026-11-26T23:59:58")
    budgets = Budgets((DAILY, Budget("monthly", "user", 1.5, "month")), clock)
    record(budgets, "created", "p1", 1.0)
    refused = budgets.admit("dev", "alice", None, 0.01)
    assert isinstance(refused, Exceeded)
    assert refused.budget == "daily"
    assert refused.resets_at == "2026-11-27T00:00:00Z"
    assert refused.retry_after == 2
    clock.now += 1.5
    refused = budgets.admit("dev", "alice", None, 0.01)
    assert isinstance(refused, Exceeded) and refused.retry_after == 1
    clock.now = at("2026-11-27T00:00:00")
    hold = budgets.admit("dev", "alice", None, 0.5)
    assert isinstance(hold, Hold)  # a new day, but the month still counts the dollar
    assert isinstance(budgets.admit("dev", "alice", None, 0.5), Exceeded)
    hold.release()
    record(budgets, "succeeded", "p1", 0.4)  # yesterday's create finishes today
    assert spent(budgets, "daily", "alice") == pytest.approx(0.4)
    assert spent(budgets, "monthly", "alice") == pytest.approx(0.4)
    clock.now = at("2026-12-01T00:00:00")
    assert spent(budgets, "monthly", "alice") == 0.0


@pytest.mark.parametrize(
    ("budget", "user", "client", "env", "other"),
    [
        (Budget("b", "user", 1.0, "day"), "alice", "app", "dev", ("dev", "bob", "app")),
        (Budget("b", "client", 1.0, "day"), "alice", "app", "dev", ("dev", "alice", "other")),
        (Budget("b", "environment", 1.0, "day"), "alice", "app", "dev", ("staging", "alice", "app")),
        (
            Budget("b", "user", 1.0, "day", frozenset({"dev"})),
            "alice",
            None,
            "dev",
            ("staging", "alice", None),
        ),
    ],
)
def test_subjects_are_counted_apart(
    budget: Budget, user: str, client: str | None, env: str, other: tuple[str, str, str | None]
) -> None:
    budgets = Budgets((budget,), Clock("2026-11-26T10:00:00"))
    budgets.record(budgets.clock(), env, user, client, "created", "p1", 1.0)
    assert isinstance(budgets.admit(env, user, client, 0.01), Exceeded)
    assert isinstance(budgets.admit(*other, 0.01), Hold)


def test_no_budget_means_no_refusal() -> None:
    budgets = Budgets((), Clock("2026-11-26T10:00:00"))
    for n in range(50):
        record(budgets, "created", f"p{n}", 1e6)
        assert budgets.admit("dev", "alice", None, 1e9) is NO_HOLD
    assert not budgets.applies("dev")
    scoped = Budgets(
        (Budget("b", "user", 0.0, "day", frozenset({"production"})),), Clock("2026-11-26T10:00:00")
    )
    assert scoped.admit("dev", "alice", None, 1e9) is NO_HOLD


def test_warn_at_logs_once_per_subject_and_period(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "skyproxy.budgets")
    clock = Clock("2026-11-26T10:00:00")
    budgets = Budgets((Budget("daily", "user", 1.0, "day", warn_at=0.5),), clock)
    record(budgets, "created", "p1", 0.4)
    assert budgets.warnings == {}
    for n in range(2, 5):
        record(budgets, "created", f"p{n}", 0.1)
    record(budgets, "created", "p9", 0.6, user="bob")
    assert budgets.warnings == {"daily": 2}
    assert len([r for r in caplog.records if "budget daily" in r.getMessage()]) == 2
    clock.now = at("2026-11-27T10:00:00")
    record(budgets, "created", "p5", 0.6)
    assert budgets.warnings == {"daily": 3}


def test_a_reload_that_changes_budgets_counts_spend_already_made() -> None:
    budgets = Budgets((Budget("team", "environment", 100.0, "day"),), Clock("2026-11-26T10:00:00"))
    record(budgets, "created", "p1", 0.75)
    hold = budgets.admit("dev", "alice", None, 0.1)
    budgets.reconfigure((DAILY, Budget("weekly", "user", 1.0, "week")))
    assert spent(budgets, "daily", "alice") == 0.75  # days were counted: recounted per user
    assert spent(budgets, "weekly", "alice") == 0.0  # weeks were not: counted from the reload on
    assert isinstance(budgets.admit("dev", "alice", None, 0.3), Exceeded)
    hold.release()  # a hold from before the reload releases harmlessly
    record(budgets, "created", "p2", 0.1)
    assert spent(budgets, "weekly", "alice") == 0.1


def test_with_no_budget_nothing_is_kept() -> None:
    budgets = Budgets((), Clock("2026-11-26T10:00:00"))
    record(budgets, "created", "p1", 0.75)
    assert all(not w.spent for w in budgets.ledger.windows.values())


# -- restart: spend is rebuilt from the audit files, exactly as they show it ------------------

WRITER = """
import sys, time
from pathlib import Path
from skyproxy.audit.record import AuditRecord
from skyproxy.audit.writer import AuditWriter
from skyproxy.config import AuditSettings

writer = AuditWriter(AuditSettings(path=Path(sys.argv[1])))
writer.start()
for n, (user, status, pid, cost) in enumerate(
    [("alice", "created", "p1", 0.25), ("alice", "created", "p2", 0.25), ("alice", "succeeded", "p1", 0.1),
     ("bob", "created", "p3", 0.5), ("bob", "failed", None, None), ("alice", "created", "p4", None),
     ("alice", "succeeded", "p4", 0.05)]
):
    writer.submit(AuditRecord(environment="dev", userId=user, predictionId=pid, model="m", status=status,
        httpStatus=200, latencyMs=1.0, costUsd=cost, ipAddress=None, requestId=str(n), keyFingerprint=None,
        method="POST", path="/v1/predictions"))
while writer.written < 7:
    time.sleep(0.01)
print("written", flush=True)
time.sleep(600)  # killed here, with the writer thread still running
"""


def test_spend_survives_a_sigkill_as_the_audit_files_show_it(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"written\n"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
    budgets = Budgets((DAILY, Budget("team", "environment", 10.0, "month")))
    assert budgets.ledger.replay(path) == 7
    shown = {row.key: round(row.cost_usd, 9) for row in summarize([path], None, "user").rows}
    assert shown == {"alice": 0.4, "bob": 0.5}
    assert spent(budgets, "daily", "alice") == 0.4
    assert spent(budgets, "daily", "bob") == 0.5
    assert spent(budgets, "team", "dev") == 0.9
    refused = budgets.admit("dev", "alice", None, 0.61)
    assert isinstance(refused, Exceeded) and refused.spent_usd == 0.4


def test_replay_reads_only_the_current_periods(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    old = {"timestamp": "2026-10-31T23:59:59.000Z", "costUsd": 5.0, "predictionId": None}
    new = {"timestamp": "2026-11-26T09:00:00.000Z", "costUsd": 0.25, "predictionId": None}
    base = {
        "event": "prediction", "environment": "dev", "userId": "alice", "model": "m", "status": "failed",
        "latencyMs": 1.0,
    }  # fmt: skip
    path.write_text("".join(json.dumps(base | x) + "\n" for x in (old, new)) + "not json\n")
    budgets = Budgets((Budget("m", "user", 10.0, "month"),), Clock("2026-11-26T10:00:00"))
    assert budgets.ledger.replay(path) == 1
    assert spent(budgets, "m", "alice") == 0.25


async def test_a_ledger_rebuilt_off_the_loop_is_ready_before_admitting(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    line = {
        "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"), "event": "prediction",
        "environment": "dev", "userId": "alice", "predictionId": "p1", "model": "m", "status": "created",
        "latencyMs": 1.0, "costUsd": 1.0,
    }  # fmt: skip
    path.write_text(json.dumps(line) + "\n")
    budgets = Budgets((DAILY,))
    task = asyncio.create_task(asyncio.to_thread(budgets.ledger.replay, path))
    await eventually(task.done, "the replay finished")
    assert isinstance(budgets.admit("dev", "alice", None, 0.01), Exceeded)


def test_refused_creates_are_not_remembered() -> None:
    """A flood of refused (or failed) creates changes no spend and must not grow memory:
    the daemon runs for months, and each such line has its own timestamp."""
    clock = Clock("2026-11-26T10:00:00")
    budgets = Budgets((DAILY,), clock)
    for n in range(5000):
        clock.now += 0.001
        record(budgets, "rejected", None, None, user=f"user-{n}")
    record(budgets, "failed", None, 0.25)  # a line's own cost still counts
    assert len(budgets.ledger.costs) == 0
    assert spent(budgets, "daily", "alice") == 0.25


def test_a_reload_keeps_the_reservations_in_flight() -> None:
    """A hold taken before a reload releases into the same budget after it, so the reload
    neither frees nor strands reserved money."""
    budgets = Budgets((DAILY,), Clock("2026-11-26T10:00:00"))
    hold = budgets.admit("dev", "alice", None, 0.75)
    assert isinstance(hold, Hold) and hold is not NO_HOLD
    budgets.reconfigure((DAILY, Budget("monthly", "user", 10.0, "month")))
    assert isinstance(budgets.admit("dev", "alice", None, 0.5), Exceeded)  # 0.75 is still held
    hold.release()
    assert isinstance(budgets.admit("dev", "alice", None, 0.5), Hold)
    assert [row["reserved_usd"] for row in budgets.snapshot() if row["budget"] == "daily"] == [0.5]
