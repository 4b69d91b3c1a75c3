"""Rate limits against their clock, the running loop's `time()`.

Most tests freeze that clock (`clock` fixture) and move it by hand, so every number
is exact; the tests of real waiting use real, short times and assert lower bounds only.
"""

from __future__ import annotations

import asyncio
import gc

import pytest
from helpers.clock import FakeClock, freeze_loop_clock

from skyproxy.config import EnvironmentSettings, KeySpec, Listen, Rate, RateRule
from skyproxy.proxy.limits import Limits, Verdict

PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
MESSAGE_10_MIN = (
    "Your generation limit (10/min) has been reached. The next request fits in 6 s (Retry-After); "
    "all 10 are available again in 60 s (RateLimit-Reset)."
)


@pytest.fixture
async def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return freeze_loop_clock(monkeypatch)


def rate(text: str) -> Rate:
    count, unit = text.split("/")
    return Rate(int(count), PERIODS[unit], unit)


def rule(
    name: str = "predictions",
    *,
    per_user: str | None = "10/minute",
    per_environment: str | None = None,
    max_wait: float = 0.0,
    paths: tuple[str, ...] = ("/v1/predictions", "/v1/predict"),
    methods: tuple[str, ...] = ("POST",),
) -> RateRule:
    return RateRule(
        name=name,
        methods=frozenset(methods),
        paths=paths,
        per_user=rate(per_user) if per_user else None,
        per_environment=rate(per_environment) if per_environment else None,
        max_wait=max_wait,
    )


def environments(*rules: RateRule, name: str = "dev") -> dict[str, EnvironmentSettings]:
    env = EnvironmentSettings(
        name=name,
        listen=(Listen("127.0.0.1", 8787),),
        upstream="mock",
        key=KeySpec("generated"),
        rules=rules,
    )
    return {name: env}


async def post(limits: Limits, user: str, path: str = "/v1/predictions", env: str = "dev") -> Verdict:
    verdict = await limits.check(env, "POST", path, user)
    assert verdict is not None, "expected a limited route"
    return verdict


async def posts(limits: Limits, user: str, times: int) -> list[Verdict]:
    return [await post(limits, user) for _ in range(times)]


# -- per user ---------------------------------------------------------------------------


async def test_eleventh_request_in_a_minute_is_rejected_then_capacity_returns(
    clock: FakeClock,
) -> None:
    limits = Limits(environments(rule(per_user="10/minute")))
    assert all(v.allowed for v in await posts(limits, "alice", 10))

    rejected = await post(limits, "alice")
    assert rejected.allowed is False
    assert rejected.code == "rate_limited"
    assert rejected.message == MESSAGE_10_MIN
    assert rejected.scope == "user"
    assert rejected.rule == "predictions"
    assert rejected.retry_after == 6  # one unit of 10/min drains in 6 s

    clock.advance(60)
    again = await posts(limits, "alice", 11)
    assert [v.allowed for v in again] == [True] * 10 + [False]
    assert again[0].headers["RateLimit-Remaining"] == "9"


async def test_message_numbers_come_from_the_rule(clock: FakeClock) -> None:
    limits = Limits(environments(rule(per_user="3/hour")))
    await posts(limits, "alice", 3)
    rejected = await post(limits, "alice")
    assert rejected.message == (
        "Your generation limit (3/hour) has been reached. The next request fits in 1200 s "
        "(Retry-After); all 3 are available again in 3600 s (RateLimit-Reset)."
    )
    assert rejected.retry_after == 1200


async def test_retry_after_is_computed_from_the_bucket(clock: FakeClock) -> None:
    limits = Limits(environments(rule(per_user="10/minute")))
    await posts(limits, "alice", 10)

    seen = []
    for step in (0.0, 2.5, 3.0):  # at 0 s, 2.5 s and 5.5 s after the burst
        clock.advance(step)
        verdict = await post(limits, "alice")
        assert not verdict.allowed
        assert verdict.headers["Retry-After"] == str(verdict.retry_after)
        seen.append(verdict.retry_after)
    assert seen == [6, 4, 1]  # 6 s, 3.5 s and 0.5 s left, rounded up, never below 1

    clock.advance(0.5)  # 6 s after the burst one unit has drained
    assert (await post(limits, "alice")).allowed


async def test_ratelimit_headers_follow_the_bucket(clock: FakeClock) -> None:
    limits = Limits(environments(rule(per_user="10/minute")))  # one unit drains per 6 s
    first = await post(limits, "alice")
    assert first.headers == {
        "RateLimit-Limit": "10",
        "RateLimit-Remaining": "9",
        "RateLimit-Reset": "6",
    }
    clock.advance(2.5)  # level 1 -> 0.58; this request makes it 1.58
    second = await post(limits, "alice")
    assert second.headers["RateLimit-Remaining"] == "8"
    assert second.headers["RateLimit-Reset"] == "10"  # 9.5 s, rounded up

    fifth = (await posts(limits, "alice", 3))[-1]  # level 4.58
    assert fifth.headers["RateLimit-Remaining"] == "5"
    assert fifth.headers["RateLimit-Reset"] == "28"  # 27.5 s

    clock.advance(10)  # level 4.58 -> 2.92; this request makes it 3.92
    sixth = await post(limits, "alice")
    assert sixth.headers["RateLimit-Remaining"] == "6"
    assert sixth.headers["RateLimit-Reset"] == "24"  # 23.5 s

    more = await posts(limits, "alice", 7)
    assert [v.allowed for v in more] == [True] * 6 + [False]
    last = more[-1]
    assert last.headers["RateLimit-Remaining"] == "0"
    assert last.headers["RateLimit-Limit"] == "10"
    assert last.headers["RateLimit-Reset"] == "60"  # 9.92 units: 59.5 s
    assert last.headers["Retry-After"] == str(last.retry_after) == "6"  # 0.92 unit: 5.5 s
    assert "Retry-After" not in more[-2].headers


async def test_users_are_isolated(clock: FakeClock) -> None:
    limits = Limits(environments(rule(per_user="10/minute")))
    await posts(limits, "alice", 10)
    assert not (await post(limits, "alice")).allowed

    bob = await post(limits, "bob")
    assert bob.allowed
    assert bob.headers["RateLimit-Remaining"] == "9"
    assert limits.bucket_count() == 2


# -- per environment --------------------------------------------------------------------


async def test_environment_limit_without_wait_rejects_at_once(clock: FakeClock) -> None:
    limits = Limits(environments(rule(per_user=None, per_environment="3/minute")))
    allowed = [await post(limits, f"user-{i}") for i in range(3)]
    assert all(v.allowed for v in allowed)
    # Without a per-user rate the headers describe the environment quota.
    assert allowed[0].headers == {
        "RateLimit-Limit": "3",
        "RateLimit-Remaining": "2",
        "RateLimit-Reset": "20",
    }

    rejected = await post(limits, "user-3")
    assert rejected.allowed is False
    assert rejected.code == "environment_rate_limited"
    assert rejected.scope == "environment"
    assert rejected.message == (
        "The environment's request quota (3/min) has been reached. The next request fits in 20 s "
        "(Retry-After); all 3 are available again in 60 s (RateLimit-Reset)."
    )
    assert rejected.retry_after == 20
    assert rejected.headers == {
        "RateLimit-Limit": "3",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "60",
        "Retry-After": "20",
    }


async def test_default_rule_shares_the_environment_quota(clock: FakeClock) -> None:
    limits = Limits(environments(rule(per_user="10/minute", per_environment="25/minute")))
    await posts(limits, "alice", 10)
    await posts(limits, "bob", 10)
    carol = await posts(limits, "carol", 6)
    assert [v.allowed for v in carol] == [True] * 5 + [False]
    # Allowed answers describe carol's own bucket, not the shared quota.
    assert carol[4].headers["RateLimit-Limit"] == "10"
    assert carol[4].headers["RateLimit-Remaining"] == "5"
    assert carol[5].code == "environment_rate_limited"
    assert carol[5].message is not None and "(25/min)" in carol[5].message
    assert carol[5].retry_after == 3  # 60/25 = 2.4 s, rounded up


async def test_environment_rejection_takes_no_user_unit(clock: FakeClock) -> None:
    limits = Limits(environments(rule(per_user="2/minute", per_environment="3/minute")))
    for user in ("alice", "bob", "carol"):
        assert (await post(limits, user)).allowed
    assert (await post(limits, "alice")).code == "environment_rate_limited"

    # 20 s later one environment unit has drained. Alice's bucket holds only her first
    # request (1 - 20/30 units); had the rejected one counted, she would be over 2.
    clock.advance(20)
    verdict = await post(limits, "alice")
    assert verdict.allowed
    assert verdict.headers["RateLimit-Remaining"] == "0"
    assert verdict.headers["RateLimit-Reset"] == "40"  # 1.33 units at one per 30 s


async def test_user_rejection_takes_no_environment_unit(clock: FakeClock) -> None:
    limits = Limits(environments(rule(per_user="1/minute", per_environment="2/minute")))
    assert (await post(limits, "alice")).allowed
    for _ in range(3):
        assert (await post(limits, "alice")).code == "rate_limited"
    assert (await post(limits, "bob")).allowed
    assert (await post(limits, "carol")).code == "environment_rate_limited"


async def test_environment_rejects_at_once_when_the_wait_exceeds_max_wait(
    clock: FakeClock,
) -> None:
    # The clock is frozen: a request that tried to wait here would never return.
    limits = Limits(environments(rule(per_user=None, per_environment="2/minute", max_wait=10)))
    assert (await post(limits, "a")).allowed
    assert (await post(limits, "b")).allowed
    rejected = await post(limits, "c")
    assert rejected.code == "environment_rate_limited"
    assert rejected.retry_after == 20  # capacity in 30 s, of which 10 may be waited


async def test_environment_waits_up_to_max_wait_then_succeeds() -> None:
    # Real time: 5/second with max_wait 1. Requests 6 and 7 wait about 0.2 s and 0.4 s.
    limits = Limits(environments(rule(per_user=None, per_environment="5/second", max_wait=1)))
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def timed(user: str) -> tuple[Verdict, float]:
        verdict = await post(limits, user)
        return verdict, loop.time() - start

    results = await asyncio.gather(*(timed(f"user-{i}") for i in range(7)))
    assert all(verdict.allowed for verdict, _ in results)
    # Only a lower bound: waiting can take longer on a slow machine, never less.
    assert max(elapsed for _, elapsed in results) >= 0.35


async def test_cancelled_wait_gives_its_units_back(clock: FakeClock) -> None:
    limits = Limits(environments(rule(per_user="1/minute", per_environment="1/minute", max_wait=45)))
    assert (await post(limits, "alice")).allowed
    clock.advance(30)  # the environment bucket is half drained: bob must wait 30 s

    waiting = asyncio.ensure_future(post(limits, "bob"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    # Refunded, both of bob's buckets are empty 30 s later; kept, his own bucket would
    # still hold half a unit and the environment's wait would be 60 s > max_wait.
    clock.advance(30)
    verdict = await post(limits, "bob")
    assert verdict.allowed, verdict


# -- routes -----------------------------------------------------------------------------


async def test_unmatched_routes_are_not_limited(clock: FakeClock) -> None:
    limits = Limits(
        environments(
            rule(paths=("/v1/predictions", "/v1/models/*")),
            rule("nothing", per_user=None, paths=("/v1/free",)),
        )
    )
    unlimited = [
        ("dev", "GET", "/v1/predictions"),
        ("dev", "POST", "/v1/predictions/abc"),
        ("dev", "POST", "/v1/model"),
        ("dev", "POST", "/v1/free"),
        ("prod", "POST", "/v1/predictions"),
    ]
    for env, method, path in unlimited:
        assert not limits.is_limited(env, method, path)
        assert await limits.check(env, method, path, "alice") is None
    assert limits.is_limited("dev", "POST", "/v1/models/flux")
    assert limits.bucket_count() == 0  # neither None answers nor is_limited keep state

    verdict = await post(limits, "alice", "/v1/models/flux")
    assert verdict.allowed
    assert limits.bucket_count() == 1


async def test_all_matching_rules_apply_and_headers_show_the_tightest(clock: FakeClock) -> None:
    limits = Limits(
        environments(
            rule("burst", per_user="2/minute", paths=("/v1/predictions",)),
            rule("all", per_user="5/minute", paths=("/v1/*",)),
        )
    )
    first = await post(limits, "alice")
    assert (first.rule, first.headers["RateLimit-Limit"]) == ("burst", "2")
    assert first.headers["RateLimit-Remaining"] == "1"
    second = await post(limits, "alice")
    assert (second.rule, second.headers["RateLimit-Remaining"]) == ("burst", "0")

    third = await post(limits, "alice")
    assert (third.allowed, third.rule, third.retry_after) == (False, "burst", 30)
    assert third.message == (
        "Your generation limit (2/min) has been reached. The next request fits in 30 s "
        "(Retry-After); all 2 are available again in 60 s (RateLimit-Reset)."
    )

    # "all" holds the two allowed requests only: the rejected one took nothing there.
    other = await post(limits, "alice", "/v1/other")
    assert (other.rule, other.headers["RateLimit-Remaining"]) == ("all", "2")


async def test_headers_pick_the_lowest_remaining_whatever_the_rule_order(
    clock: FakeClock,
) -> None:
    limits = Limits(
        environments(
            rule("burst", per_user="10/minute", paths=("/v1/predictions",)),
            rule("all", per_user="2/minute", paths=("/v1/*",)),
        )
    )
    verdict = await post(limits, "alice")
    assert verdict.rule == "all"
    assert verdict.headers["RateLimit-Limit"] == "2"
    assert verdict.headers["RateLimit-Remaining"] == "1"


# -- memory -----------------------------------------------------------------------------


async def test_evict_idle_drops_drained_buckets_only(clock: FakeClock) -> None:
    limits = Limits(environments(rule(per_user="10/minute")))
    for i in range(100):
        await post(limits, f"old-{i}")
    clock.advance(30)
    for i in range(50):
        await post(limits, f"new-{i}")
    assert limits.bucket_count() == 150  # nothing has idled a whole period yet

    clock.advance(30)
    assert limits.evict_idle() == 100
    assert limits.bucket_count() == 50
    assert limits.evict_idle() == 0


async def test_user_buckets_are_invisible_to_the_garbage_collector(clock: FakeClock) -> None:
    # A full collection walks every object the collector tracks; per-user state must add
    # none, or anyone who can vary the user header can make each collection longer.
    limits = Limits(environments(rule(per_user="10/minute", per_environment="100000/minute")))
    await post(limits, "first")
    enabled = gc.isenabled()
    gc.disable()  # a collection could untrack some objects (tuples) and hide them
    try:
        before = len(gc.get_objects())
        for i in range(5000):
            assert (await post(limits, f"user-{i}")).allowed
        clock.advance(1)
        for i in range(0, 5000, 2):  # used again: their state is replaced
            assert (await post(limits, f"user-{i}")).allowed
        tracked = len(gc.get_objects()) - before
    finally:
        if enabled:
            gc.enable()
    assert limits.bucket_count() == 5002
    assert tracked < 100, f"{tracked} more objects for the collector to walk"


async def test_an_evicted_bucket_behaves_like_the_drained_one(clock: FakeClock) -> None:
    limits = Limits(environments(rule(per_user="10/minute")))
    await posts(limits, "alice", 10)
    clock.advance(60)
    assert limits.evict_idle() == 1
    verdicts = await posts(limits, "alice", 11)
    assert [v.allowed for v in verdicts] == [True] * 10 + [False]


async def test_new_users_evict_stale_buckets_on_the_hot_path(clock: FakeClock) -> None:
    limits = Limits(environments(rule(per_user="10/second")))
    for round_ in range(20):
        for i in range(1000):
            await post(limits, f"user-{round_}-{i}")
        assert limits.bucket_count() <= 2000  # never evicted, it would reach 20,000
        clock.advance(1.5)
    assert limits.bucket_count() == 1000  # the last round's users, all still fresh


async def test_hard_cap_drops_the_least_recently_used(clock: FakeClock) -> None:
    limits = Limits(environments(rule(per_user="10/minute")), max_buckets_per_rule=3)
    await posts(limits, "alice", 10)
    for user in ("bob", "carol", "dave"):
        await post(limits, user)
    assert limits.bucket_count() == 3
    assert (await post(limits, "alice")).allowed  # her full bucket was dropped

    with pytest.raises(ValueError):
        Limits(environments(rule()), max_buckets_per_rule=0)


# -- reload -----------------------------------------------------------------------------


async def test_reload_keeps_buckets_whose_rate_is_unchanged(clock: FakeClock) -> None:
    before = Limits(environments(rule(per_user="10/hour", per_environment="3/minute")))
    await posts(limits=before, user="alice", times=3)
    assert (await post(before, "bob")).code == "environment_rate_limited"

    # Same environment, rule name and rates; paths and max_wait may change.
    changed_elsewhere = rule(
        per_user="10/hour",
        per_environment="3/minute",
        paths=("/v1/predictions", "/v1/predict", "/v1/other"),
        max_wait=0.5,
    )
    after = Limits(environments(changed_elsewhere), previous=before)
    assert after.bucket_count() == before.bucket_count() == 3
    assert (await post(after, "bob")).code == "environment_rate_limited"
    clock.advance(20)
    alice = await post(after, "alice")
    assert alice.allowed
    assert alice.headers["RateLimit-Remaining"] == "6"  # 3 - 20/360 + 1 units used of 10


async def test_reload_resets_changed_rates_and_drops_removed_rules(clock: FakeClock) -> None:
    before = Limits(
        environments(
            rule("predictions", per_user="10/minute", per_environment="3/minute"),
            rule("uploads", per_user="2/minute", paths=("/v1/uploads",)),
            rule("gone", per_user="1/minute", paths=("/v1/gone",)),
        )
    )
    await posts(before, "alice", 3)
    await post(before, "alice", "/v1/uploads")
    await post(before, "alice", "/v1/uploads")
    await post(before, "alice", "/v1/gone")
    assert before.bucket_count() == 4

    after = Limits(
        environments(
            rule("predictions", per_user="20/minute", per_environment="4/minute"),
            rule("uploads", per_user="2/minute", paths=("/v1/uploads",)),
        ),
        previous=before,
    )
    # Alice's uploads bucket and the new environment bucket; the rest is new or gone.
    assert after.bucket_count() == 2
    verdict = await post(after, "alice")
    assert verdict.allowed
    assert verdict.headers["RateLimit-Remaining"] == "19"
    assert (await post(after, "alice", "/v1/uploads")).code == "rate_limited"
    assert await after.check("dev", "POST", "/v1/gone", "alice") is None


async def test_reload_drops_removed_environments(clock: FakeClock) -> None:
    before = Limits(environments(rule(per_environment="3/minute")))
    await posts(before, "alice", 2)
    after = Limits(environments(rule(per_environment="3/minute"), name="prod"), previous=before)
    assert after.bucket_count() == 1  # prod's fresh environment bucket only
    assert await after.check("dev", "POST", "/v1/predictions", "alice") is None
    verdict = await post(after, "alice", env="prod")
    assert verdict.headers["RateLimit-Remaining"] == "9"
