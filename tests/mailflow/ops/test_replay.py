import orjson

from mailflow.ops.replay import plan_dead, plan_error
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

    assert may_send(None, None)
    assert not may_send({"kind": "delivered", "ts": 5.0}, 10.0)
    assert not may_send({"kind": "permanent", "ts": 5.0}, None)
    assert may_send({"kind": "permanent", "ts": 5.0}, 10.0)
    # the replayed attempt failed again (entry rewritten at 12): the same replay record
    # arriving twice does not try a second time
    assert not may_send({"kind": "permanent", "ts": 12.0}, 10.0)


def _old_plan_dead_meta(meta: dict, domain: str, now: float) -> dict:
    """What plan_dead wrote before the typed records (meta edited by hand)."""
    out = {k: v for k, v in meta.items() if k not in ("dead", "due", "tier")}
    out.update({"domain": domain, "attempt": 0, "first_attempt": now, "replayed_at": now})
    return out


def test_a_replayed_dead_record_is_the_one_the_hand_edited_meta_made():
    meta = {"summary": {"subject": "s"}, "scan": {"scanned": True}, "dkim": "DKIM-Signature: x\r\n",
            "domain": "one.test", "attempt": 4, "first_attempt": 2.0, "last_error": "451", "due": 9.0,
            "tier": 3, "history": [{"ts": 2.0, "attempt": 1, "error": "451"}], "held_at": 3.0,
            "custom": [1], "dead": {"reason": "expired", "failed": [{"recipient": "x@one.test"}], "ts": 50.0}}
    dead = MSG.with_(meta=meta)
    plans = plan_dead(dead.to_json(), None, None, now=1000.0)
    assert len(plans) == 2
    for p in plans:
        doc = orjson.loads(p.value)
        domain = p.key.decode()
        assert doc["meta"] == _old_plan_dead_meta(meta, domain, 1000.0)
        assert doc["recipients"] == [r for r in MSG.recipients if r.endswith(domain)]
        assert {k: v for k, v in doc.items() if k not in ("meta", "recipients")} == {
            k: v for k, v in orjson.loads(dead.to_json()).items() if k not in ("meta", "recipients")}


def test_error_replays_are_keyed_as_their_topic_reads_them():
    local = MSG.with_(body=None, body_ref="messages/m1.eml", mailbox="b@mailflow.test", folder="inbox")
    err = ErrorRecord(stage="store", reason="x", state="rejected", record=local.to_json().decode())
    plan = plan_error(err.to_json(), None, None)
    assert plan and (plan.topic, plan.key) == ("local", b"b@mailflow.test")
    dl = MSG.with_(recipients=["x@one.test"], meta={"domain": "one.test"})
    err = ErrorRecord(stage="deliver", reason="x", state="rejected", record=dl.to_json().decode())
    assert plan_error(err.to_json(), None, None).key == b"one.test"
    nodomain = ErrorRecord(stage="deliver", reason="x", state="rejected", record=MSG.to_json().decode())
    assert plan_error(nodomain.to_json(), None, None).key == b"one.test"  # the first recipient's
    scanned = ErrorRecord(stage="scan", reason="virus", state="quarantined", id="m1",
                          record=MSG.to_json().decode())
    assert plan_error(scanned.to_json(), None, None).key == b"m1"
    # What the stage it would go back to cannot read is never replayed.
    bad = ErrorRecord(stage="store", reason="x", state="rejected", record=MSG.to_json().decode())
    assert plan_error(bad.to_json(), None, None) is None
