"""mailflow.ops.queue: the pure decisions behind hold, release, flush and bounce, and qshape's buckets."""

from __future__ import annotations

import orjson
import pytest

from mailflow.ops.queue import (
    BUCKET_LABELS,
    LaneEntry,
    Shape,
    age_bucket,
    bounce_requested,
    covered,
    effective_due,
    hold_of,
    normal_domain,
    normal_id,
    parse_controls,
    plan_lane,
    record_fields,
    released,
    scan_keys,
    still_held,
)
from schemas.mail import RetryState
from schemas.records import Message

T = 1_000_000.0


def test_control_records_parse_and_unreadable_ones_are_left_out():
    c = parse_controls({
        "hold|domain|held.test": {"held": True, "since": T},
        "hold|domain|free.test": {"held": False, "ts": T + 5},  # released
        "hold|id|M1": {"held": True, "since": T + 1, "id": "M1"},
        "flush|*": {"ts": T + 2}, "flush|domain|f.test": {"ts": T + 3},
        "bounce|id|M2": {"ts": T + 4},
        "flushed|domain|f.test|p.retry.1|3": {"flush_ts": T + 3, "through": 41},
        "hold|domain|bad.test": {"held": True},  # no since
        "flush|domain|bad.test": "not an object",
        "flushed|nonsense": {"flush_ts": 1, "through": 2},
    })
    assert set(c.holds) == {"domain|held.test", "id|M1"}
    assert c.flushes == {"*": T + 2, "domain|f.test": T + 3}
    assert c.bounces == {"M2": T + 4}
    assert c.flushed == {("domain|f.test", "p.retry.1", 3): (T + 3, 41)}


def test_a_hold_on_the_message_or_its_domain_applies_and_nothing_else():
    c = parse_controls({"hold|domain|held.test": {"held": True, "since": T},
                        "hold|id|M1": {"held": True, "since": T + 1, "id": "M1"}})
    assert hold_of(c, "held.test", "X")["since"] == T
    assert hold_of(c, "HELD.test", "X") is not None  # domains compare in lower case
    assert hold_of(c, "other.test", "M1")["id"] == "M1"
    assert hold_of(c, "other.test", "X") is None


def test_a_held_record_stays_until_released_or_bounced_or_held_anew():
    c = parse_controls({"hold|domain|h.test": {"held": True, "since": T}})
    held = RetryState(held_at=T + 10)
    assert still_held(c, "h.test", "M", held)
    assert not still_held(parse_controls({}), "h.test", "M", held)  # released
    assert not still_held(parse_controls({"hold|domain|h.test": {"held": False}}), "h.test", "M", held)
    # released and held again after this record was held: it goes back to be held anew
    again = parse_controls({"hold|domain|h.test": {"held": True, "since": T + 20}})
    assert not still_held(again, "h.test", "M", held)
    # a bounce request frees it so that the deliver stage can bounce it
    bounced = parse_controls({"hold|domain|h.test": {"held": True, "since": T}, "bounce|id|M": {"ts": T + 30}})
    assert not still_held(bounced, "h.test", "M", held)
    assert still_held(bounced, "h.test", "OTHER", held)


def test_a_bounce_request_does_not_apply_to_a_later_replay():
    c = parse_controls({"bounce|id|M": {"ts": T}})
    assert bounce_requested(c, "M", RetryState()) == T
    assert bounce_requested(c, "N", RetryState()) is None
    assert bounce_requested(c, "M", RetryState(replayed_at=T - 1)) == T
    assert bounce_requested(c, "M", RetryState(replayed_at=T + 1)) is None


def test_flush_makes_records_written_before_it_due_at_once():
    c = parse_controls({"flush|domain|f.test": {"ts": T}})
    due = T + 3600
    assert effective_due(c, due, T - 60, "f.test", "M") == T  # deferred an hour, flushed
    assert effective_due(c, due, T - 60, "F.TEST", "M") == T
    assert effective_due(c, due, T + 1, "f.test", "M") == due  # deferred after the flush
    assert effective_due(c, due, T - 60, "other.test", "M") == due
    assert effective_due(c, T - 5, T - 60, "f.test", "M") == T - 5  # due before the flush anyway
    everything = parse_controls({"flush|*": {"ts": T}})
    assert effective_due(everything, due, T - 60, "any.test", "M") == T
    bounce = parse_controls({"bounce|id|M": {"ts": T}})
    assert effective_due(bounce, due, T - 60, "any.test", "M") == T
    assert effective_due(bounce, due, T - 60, "any.test", "N") == due


def test_only_domain_flushes_and_bounces_need_a_scan():
    c = parse_controls({"flush|*": {"ts": T}, "flush|domain|f.test": {"ts": T + 1}, "bounce|id|M": {"ts": T + 2}})
    assert scan_keys(c) == {"domain|f.test": T + 1, "id|M": T + 2}


def test_a_record_a_scan_forwarded_is_covered_and_no_other():
    c = parse_controls({"flushed|domain|f.test|p.retry.2|1": {"flush_ts": T, "through": 100}})
    assert covered(c, "p.retry.2", 1, 100, "f.test", "M", T - 1)
    assert not covered(c, "p.retry.2", 1, 101, "f.test", "M", T - 1)  # past the scan
    assert not covered(c, "p.retry.2", 1, 50, "f.test", "M", T + 1)  # written after the flush
    assert not covered(c, "p.retry.2", 0, 50, "f.test", "M", T - 1)  # another partition
    assert not covered(c, "p.retry.2", 1, 50, "g.test", "M", T - 1)  # another domain
    byid = parse_controls({"flushed|id|M|p.retry.1|0": {"flush_ts": T, "through": 9}})
    assert covered(byid, "p.retry.1", 0, 9, "any.test", "M", T - 1)


def test_time_held_does_not_count_as_queue_age():
    state = RetryState(first_attempt=T, held_at=T + 100, attempt=2, history=[{"ts": T, "attempt": 1}])
    out = released(state, T + 400)
    assert out.first_attempt == T + 300 and out.held_at is None and out.attempt == 2
    assert out.history == [{"ts": T, "attempt": 1}, {"ts": T + 400, "held_for": 300.0}]
    fresh = released(RetryState(held_at=T), T + 5)  # never tried: no first attempt to move
    assert fresh.first_attempt is None and fresh.history == [{"ts": T + 5, "held_for": 5.0}]
    full = released(RetryState(held_at=T, history=[{"ts": float(i)} for i in range(30)]), T + 1)
    assert len(full.history or []) == 30 and (full.history or [])[-1]["held_for"] == 1.0


def _entry(offset: int, domain: str, msg_id: str = "M", held_at: float = T) -> LaneEntry:
    return LaneEntry(offset, domain, f"{msg_id}{offset}", RetryState(held_at=held_at))


def test_a_lane_moves_only_when_something_in_it_is_released():
    lane = [_entry(0, "a.test"), _entry(1, "b.test"), _entry(2, "a.test")]
    both = parse_controls({"hold|domain|a.test": {"held": True, "since": T - 1},
                           "hold|domain|b.test": {"held": True, "since": T - 1}})
    assert plan_lane(both, lane) is None  # all held: committed at the first, all of them lag
    only_a = parse_controls({"hold|domain|a.test": {"held": True, "since": T - 1}})
    plan = plan_lane(only_a, lane)
    assert [(a, e.offset) for a, e in plan] == [("reappend", 0), ("forward", 1), ("reappend", 2)]
    assert [a for a, _ in plan_lane(parse_controls({}), lane)] == ["forward"] * 3


def test_age_buckets_are_qshapes():
    assert BUCKET_LABELS == ("0-5m", "5-10m", "10-20m", "20-40m", "40-80m", "80m+")
    cases = {0: 0, 299: 0, 300: 1, 599: 1, 600: 2, 1199: 2, 1200: 3, 2400: 4, 4799: 4, 4800: 5, 10**6: 5}
    for seconds, bucket in cases.items():
        assert age_bucket(seconds) == bucket, seconds
    shape = Shape()
    for domain, age in [("a.test", 10), ("a.test", 700), ("b.test", 5000)]:
        shape.add(domain, age)
    doc = shape.to_json()
    assert doc["total"] == 3 and doc["ages"]["0-5m"] == 1 and doc["ages"]["80m+"] == 1
    assert list(doc["domains"]) == ["a.test", "b.test"]  # most first
    assert doc["domains"]["a.test"] == {"total": 2, "ages": {**dict.fromkeys(BUCKET_LABELS, 0),
                                                             "0-5m": 1, "10-20m": 1}}


def test_record_fields_and_names():
    msg = Message(id="M", sender="a@x.test", recipients=["r@d.test"], received_at=T, size=1, body=b"x",
                  meta={"domain": "D.test", "attempt": 1})
    domain, rec = record_fields(b"x.test", msg.to_json())
    assert (domain, rec.id, rec.received_at, rec.retry.attempt) == ("d.test", "M", T, 1)
    assert record_fields(b"K.test", msg.with_(meta={}).to_json())[0] == "k.test"  # no meta.domain: the key
    assert record_fields(b"k", b"not json") is None
    assert record_fields(b"k", orjson.dumps({"id": "M"})) is None  # not a record: poison
    assert normal_domain("Example.COM.") == "example.com"
    assert normal_domain("bücher.test") == "xn--bcher-kva.test"
    assert normal_id("01HXYZ-abc") == "01HXYZ-abc"
    for bad in ("", "a b", "-x.test", "x|y", "a..b"):
        with pytest.raises(ValueError):
            normal_domain(bad)
    for bad in ("", "a|b", "a b", "x" * 200):
        with pytest.raises(ValueError):
            normal_id(bad)
