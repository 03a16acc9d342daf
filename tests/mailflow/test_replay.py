import orjson

from mailflow.replay import plan_dead, plan_error
from schemas.records import ErrorRecord, Message

MSG = Message(id="m1", sender="a@mailflow.test", recipients=["x@one.test", "y@two.test"],
              received_at=1.0, size=3, body=b"abc")


def test_rejected_goes_back_to_validate_and_filters_apply():
    err = ErrorRecord(stage="validate", reason="bad_from_header", state="rejected", id="m1",
                      record=MSG.to_json().decode(), ts=100.0)
    plan = plan_error(err.to_json(), None, None)
    assert plan and plan.topic == "admitted" and plan.key == b"a@mailflow.test"
    assert plan_error(err.to_json(), "other_reason", None) is None
    assert plan_error(err.to_json(), None, since=200.0) is None


def test_poison_is_never_replayed():
    err = ErrorRecord(stage="validate", reason="not_json", state="poison", record="\\x00garbage")
    assert plan_error(err.to_json(), None, None) is None
    assert plan_error(b"not even json", None, None) is None


def test_dead_goes_back_to_delivery_per_domain_with_attempts_reset():
    dead = MSG.with_(meta={"attempt": 7, "due": 5.0, "dead": {"reason": "expired", "ts": 50.0}})
    plans = plan_dead(dead.to_json(), "expired", None, now=1000.0)
    assert sorted(p.key for p in plans) == [b"one.test", b"two.test"]
    for p in plans:
        meta = orjson.loads(p.value)["meta"]
        assert p.topic == "delivery" and meta["attempt"] == 0 and "dead" not in meta
        assert meta["first_attempt"] == 1000.0
    assert plan_dead(dead.to_json(), "permanent", None, now=1000.0) == []


def test_ledger_lets_a_replay_retry_permanent_failures_but_never_resend_delivered():
    from agents.deliver import may_send

    assert may_send(None, {})
    assert not may_send({"kind": "delivered", "ts": 5.0}, {"replayed_at": 10.0})
    assert not may_send({"kind": "permanent", "ts": 5.0}, {})
    assert may_send({"kind": "permanent", "ts": 5.0}, {"replayed_at": 10.0})
    # the replayed attempt failed again (entry rewritten at 12): the same replay record
    # arriving twice does not try a second time
    assert not may_send({"kind": "permanent", "ts": 12.0}, {"replayed_at": 10.0})
