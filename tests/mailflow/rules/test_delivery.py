"""mailflow.rules.delivery: reply classes, the retry ladder, expiry and the Shaper (pure, no I/O)."""

from __future__ import annotations

import pytest

from mailflow.rules.delivery import (
    DELIVERED,
    PERMANENT,
    TEMPORARY,
    Outcome,
    Shaper,
    classify_code,
    default_schedule,
    expired,
    next_due,
    reply_class,
    retry_tier,
)


@pytest.mark.parametrize(("code", "kind"), [
    (250, DELIVERED), (251, DELIVERED), (200, DELIVERED), (299, DELIVERED),
    (421, TEMPORARY), (450, TEMPORARY), (451, TEMPORARY), (452, TEMPORARY), (499, TEMPORARY),
    (500, PERMANENT), (550, PERMANENT), (552, PERMANENT), (553, PERMANENT), (554, PERMANENT),
    (599, PERMANENT),
    # odd replies (1xx, 3xx, out of range) are worth another try, never a bounce
    (354, TEMPORARY), (199, TEMPORARY), (0, TEMPORARY), (600, TEMPORARY), (999, TEMPORARY),
])
def test_classify_code(code: int, kind: str) -> None:
    assert classify_code(code) == kind


def test_reply_class_is_a_bounded_label() -> None:
    assert reply_class(Outcome("a@b", DELIVERED, 250, "250 ok")) == "2xx"
    assert reply_class(Outcome("a@b", PERMANENT, 550, "550 no")) == "5xx"
    assert reply_class(Outcome("a@b", TEMPORARY, None, "connection refused")) == "conn"


@pytest.mark.parametrize(("attempt", "tiers", "tier"), [
    (1, 3, 1), (2, 3, 2), (3, 3, 3),
    (4, 3, 3), (100, 3, 3),          # past the last tier mail stays there
    (0, 3, 1), (-5, 3, 1),           # never below the first tier
    (1, 1, 1), (7, 1, 1),
    (9, 9, 9), (10, 9, 9),
])
def test_retry_tier(attempt: int, tiers: int, tier: int) -> None:
    assert retry_tier(attempt, tiers) == tier


def test_next_due_follows_the_schedule() -> None:
    schedule = (0.2, 0.4, 0.8)
    now = 1_000.0
    assert next_due(now, 1, schedule) == (1, pytest.approx(now + 0.2))
    assert next_due(now, 2, schedule) == (2, pytest.approx(now + 0.4))
    assert next_due(now, 3, schedule) == (3, pytest.approx(now + 0.8))
    assert next_due(now, 4, schedule) == (3, pytest.approx(now + 0.8))
    # the retry after attempt k waits the k-th delay: cumulative 0.2, 0.6, 1.4 for k = 3
    t, waits = now, []
    for attempt in (1, 2, 3):
        _, due = next_due(t, attempt, schedule)
        waits.append(due - t)
        t = due
    assert waits == pytest.approx([0.2, 0.4, 0.8]) and t - now == pytest.approx(1.4)


def test_next_due_default_contract_schedule() -> None:
    schedule = (60, 120, 240, 480, 960, 1920, 3600, 7200, 14400)  # the contract's example
    assert [next_due(0, a, schedule) for a in (1, 9, 12)] == [(1, 60), (9, 14400), (9, 14400)]


def test_expired_boundaries() -> None:
    assert not expired(100.0, 100.0, 5.0)
    assert not expired(100.0, 104.999, 5.0)
    assert expired(100.0, 105.0, 5.0)       # at the limit counts as expired
    assert expired(100.0, 10_000.0, 5.0)
    assert expired(100.0, 100.0, 0.0)       # a zero lifetime: the first check expires it
    assert not expired(100.0, 99.0, 5.0)    # a clock step back never expires mail


def test_default_schedule_doubles_up_to_about_four_hours() -> None:
    s = default_schedule()
    assert s[0] == 60 and all(b == 2 * a for a, b in zip(s, s[1:], strict=False))
    assert s[-1] == 15360  # 4h16m: the last doubling within 10 % of 4 h
    assert default_schedule(1.0, 4.0) == (1.0, 2.0, 4.0)


def test_shaper_bounds_in_flight_per_destination() -> None:
    sh = Shaper(max_in_flight=2)
    assert sh.try_acquire("a.test", now=0) and sh.try_acquire("a.test", now=0)
    assert not sh.try_acquire("a.test", now=0)   # at its bound: step aside
    assert sh.try_acquire("b.test", now=0)       # other destinations are not affected
    sh.release("a.test")
    assert sh.try_acquire("a.test", now=0)
    assert sh.in_flight == {"a.test": 2, "b.test": 1}


def test_shaper_release_cleans_up_and_never_goes_negative() -> None:
    sh = Shaper(max_in_flight=1)
    assert sh.try_acquire("a.test", now=0)
    sh.release("a.test")
    assert sh.in_flight == {}
    sh.release("a.test")  # a stray release
    sh.release("never.test")
    assert sh.in_flight == {}
    assert sh.try_acquire("a.test", now=0) and not sh.try_acquire("a.test", now=0)


def test_shaper_rate_window() -> None:
    sh = Shaper(max_in_flight=100, rate=(3, 10.0))
    for _ in range(3):
        assert sh.try_acquire("a.test", now=0.0)
        sh.release("a.test")
    assert not sh.try_acquire("a.test", now=5.0)     # 3 per 10 s used up
    assert sh.try_acquire("b.test", now=5.0)         # per destination
    assert sh.try_acquire("a.test", now=10.0)        # a new window
    assert sh.in_flight == {"a.test": 1, "b.test": 1}


def test_shaper_refusal_by_rate_takes_no_slot() -> None:
    sh = Shaper(max_in_flight=1, rate=(1, 60.0))
    assert sh.try_acquire("a.test", now=0.0)
    sh.release("a.test")
    assert not sh.try_acquire("a.test", now=1.0)
    assert sh.in_flight == {}  # the refused attempt holds nothing to release


def test_shaper_refusal_by_bound_does_not_spend_rate() -> None:
    sh = Shaper(max_in_flight=1, rate=(2, 60.0))
    assert sh.try_acquire("a.test", now=0.0)
    assert not sh.try_acquire("a.test", now=0.0)  # at the in-flight bound
    sh.release("a.test")
    assert sh.try_acquire("a.test", now=1.0)      # the refusal did not use the 2nd slot
