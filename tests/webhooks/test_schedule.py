"""The retry policy on its own: fixed randomness and a fixed clock, no waiting."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from skyproxy.webhooks.schedule import decide, retry_after_seconds

SCHEDULE = (5.0, 30.0, 120.0)
NOW = 1_800_000_000.0


def low() -> float:
    return 0.0


def high() -> float:
    return 1.0


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_any_2xx_is_delivered(status: int) -> None:
    assert decide(1, status, None, SCHEDULE, NOW, low).verdict == "delivered"


def test_410_is_gone_whatever_the_attempt() -> None:
    assert decide(1, 410, None, SCHEDULE, NOW, low).verdict == "gone"
    assert decide(9, 410, None, SCHEDULE, NOW, low).verdict == "gone"


@pytest.mark.parametrize("status", [None, 301, 400, 404, 500, 502])
def test_other_answers_and_no_answer_retry_on_the_schedule_with_jitter(status: int | None) -> None:
    for attempt, slot in enumerate(SCHEDULE, start=1):
        lo = decide(attempt, status, None, SCHEDULE, NOW, low)
        hi = decide(attempt, status, None, SCHEDULE, NOW, high)
        assert lo.verdict == hi.verdict == "retry"
        assert lo.delay == pytest.approx(slot * 0.9)
        assert hi.delay == pytest.approx(slot * 1.1)
    assert decide(len(SCHEDULE) + 1, status, None, SCHEDULE, NOW, low).verdict == "dead"


def test_an_empty_schedule_means_one_attempt() -> None:
    assert decide(1, 500, None, (), NOW, low).verdict == "dead"


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured_up_to_the_next_slot(status: int) -> None:
    assert decide(1, status, "2", SCHEDULE, NOW, high).delay == 2.0
    assert decide(1, status, "3600", SCHEDULE, NOW, high).delay == 5.0  # capped at the slot
    assert decide(2, status, "10", SCHEDULE, NOW, high).delay == 10.0
    assert decide(1, status, formatdate(NOW + 3, usegmt=True), SCHEDULE, NOW, high).delay == pytest.approx(3)


def test_retry_after_on_other_statuses_is_ignored() -> None:
    assert decide(1, 500, "1", SCHEDULE, NOW, high).delay == pytest.approx(5.5)


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "1.5e9", "Mon, 99 Foo 2020"])
def test_unusable_retry_after_values(value: str | None) -> None:
    assert retry_after_seconds(value, NOW) is None


def test_a_date_in_the_past_means_now() -> None:
    assert retry_after_seconds(formatdate(NOW - 100, usegmt=True), NOW) == 0.0
