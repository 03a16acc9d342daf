"""schemas.mail: one typed record per topic over today's JSON, and its JSON Schemas.

The fixtures are built with `Message` exactly as today's writers build them (the
line each mirrors is named), so "today's records" here are today's bytes.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import jsonschema
import orjson
import pytest
from referencing import Registry, Resource

from mailflow.rules import mailbox
from schemas.mail import (
    LOCAL_FOLDERS,
    DeadLetter,
    Delivery,
    LocalCopy,
    MailRecord,
    Outgoing,
    RetryState,
    ScanVerdict,
    Submission,
    parse_deferred,
    parse_delivery,
    parse_local,
    parse_outgoing,
    parse_submission,
)
from schemas.records import (
    ErrorRecord,
    Event,
    Message,
    PoisonPill,
    event_dicts,
    parse_error,
    parse_event,
    parse_events,
    parse_message,
)

T = 1_700_000_000.0
BODY = b"From: a@mailflow.test\r\nTo: x@one.test\r\nSubject: hi\r\n\r\nhello\r\n"
SUMMARY = {"subject": "hi", "from": "a@mailflow.test", "to": "x@one.test", "cc": "", "date": "",
           "message_id": "<m1@mailflow.test>", "has_attachments": False}
DKIM = "DKIM-Signature: v=1; a=rsa-sha256; d=mailflow.test; s=s1; b=abc\r\n"
LINKS = {"x@one.test": "https://mail.test/v1/unsubscribe/tok"}


def _schemas() -> dict[str, dict[str, Any]]:
    files = resources.files("schemas")
    return {p.name: json.loads(p.read_text()) for p in files.iterdir() if p.name.endswith(".v1.json")}


SCHEMAS = _schemas()
REGISTRY: Registry = Registry().with_resources(
    (s["$id"], Resource.from_contents(s)) for s in SCHEMAS.values())


def validate(doc: Any, name: str, pointer: str = "") -> None:
    """Validate `doc` against schemas/`name` (or a `$defs` entry of it)."""
    schema = SCHEMAS[name] if not pointer else {"$ref": SCHEMAS[name]["$id"] + pointer}
    jsonschema.Draft202012Validator(schema, registry=REGISTRY).validate(doc)


# --------------------------------------------------------------------------- today's writers


def api_submission() -> Message:  # mailflow/api/server.py _accept
    rec = Message(id="m1", sender="a@mailflow.test", recipients=["x@one.test", "y@two.test", "b@mailflow.test"],
                  received_at=T, size=len(BODY))
    rec.meta["unsubscribe"] = {**LINKS, "y@two.test": "https://mail.test/v1/unsubscribe/tok2"}
    rec.body = BODY
    return rec


def kafka_submission() -> Message:  # schemas/submission.py make_submission, tests/harness.py
    return Message(id="m2", sender="app@ext.test", recipients=["x@one.test"], received_at=T,
                   size=len(BODY), body=None, body_ref="messages/m2.eml", source="kafka")


def validated_meta(msg: Message) -> dict[str, Any]:  # agents/validate.py
    return {**msg.meta, "summary": SUMMARY}


def local_inbox() -> Message:  # agents/validate.py, the inbox copy
    msg = api_submission()
    return msg.with_(body=None, body_ref="messages/m1.eml", recipients=["b@mailflow.test"],
                     mailbox="b@mailflow.test", folder="inbox", meta=validated_meta(msg))


def local_sent() -> Message:  # agents/validate.py, the local sender's Sent copy
    msg = api_submission()
    return msg.with_(body=None, body_ref="messages/m1.eml", recipients=msg.recipients,
                     mailbox="a@mailflow.test", folder="sent", meta=validated_meta(msg))


def outgoing() -> Message:  # agents/validate.py, the remote recipients
    msg = api_submission()
    return msg.with_(recipients=["x@one.test", "y@two.test"], meta=validated_meta(msg))


def clean() -> Message:  # agents/scan.py, scanned
    msg = outgoing()
    return msg.with_(meta={**msg.meta, "scan": {"scanned": True, "spam_score": 1.5, "spam_action": "no action"}})


def clean_unscanned() -> Message:  # agents/scan.py, SCAN_FAILURE=open
    msg = outgoing()
    return msg.with_(meta={**msg.meta, "scan": {"scanned": False, "reason": "clamd: connection refused"}})


def signed() -> Message:  # agents/sentfolder.py, DKIM with one-click unsubscribe
    msg = clean()
    meta = {**msg.meta, "dkim": DKIM, "dkim_rcpt": {r: DKIM for r in msg.meta["unsubscribe"]}}
    return msg.with_(meta=meta)


def delivery() -> Message:  # agents/sentfolder.py, one record per domain
    msg = signed()
    return msg.with_(recipients=["x@one.test"], meta={**msg.meta, "domain": "one.test"})


def sent_copy() -> Message:  # agents/sentfolder.py, the Sent copy by reference
    msg = signed()
    return msg.with_(body=None, body_ref="messages/m1.eml").with_(mailbox=msg.sender, folder="sent")


def deferred() -> Message:  # agents/deliver.py to_retry
    msg = delivery()
    reason = "451 4.7.1 try again later"
    meta = {**msg.meta, "domain": "one.test", "attempt": 1, "first_attempt": T + 1, "last_error": reason,
            "due": T + 61, "tier": 1, "history": [{"ts": T + 1, "attempt": 1, "error": reason}]}
    return msg.with_(recipients=["x@one.test"], meta=meta)


def held() -> Message:  # agents/deliver.py to_hold
    msg = deferred()
    return msg.with_(meta={**msg.meta, "domain": "one.test", "held_at": T + 100.0})


def released() -> Message:  # agents/retry.py settle_lane + released_meta (before the typed records)
    msg = held()
    out = {k: v for k, v in msg.meta.items() if k != "held_at"}
    out["first_attempt"] = float(out["first_attempt"]) + 300.0
    out["history"] = [*msg.meta["history"], {"ts": T + 400, "held_for": 300.0}][-30:]
    return msg.with_(meta=out)


def dead() -> Message:  # agents/deliver.py bounce
    msg = deferred()
    failed = [{"recipient": "x@one.test", "kind": "permanent", "code": 550, "reply": "550 5.1.1 no such user",
               "host": "mx.one.test", "tls": {"version": "TLSv1.3", "verified": True}}]
    history = [*msg.meta["history"], {"ts": T + 70, "failed": ["x@one.test"], "error": "550 5.1.1 no such user"}]
    return msg.with_(recipients=["x@one.test"], meta={**msg.meta, "history": history[-30:],
                                                      "dead": {"reason": "permanent", "failed": failed, "ts": T + 70}})


def bounce_local() -> Message:  # agents/deliver.py bounce, to admitted for a local sender
    return Message(id="b1", sender="", recipients=["a@mailflow.test"], received_at=T + 70, size=len(BODY),
                   body=BODY, source="bounce", meta={"bounce": True, "bounce_of": "m1", "dkim": DKIM})


def bounce_remote() -> Message:  # agents/deliver.py bounce, to delivery for a remote sender
    msg = bounce_local().with_(recipients=["app@ext.test"])
    return msg.with_(meta={**msg.meta, "domain": "ext.test"})


def replayed() -> Message:  # mailflow/ops/replay.py plan_dead (before the typed records)
    msg = dead()
    meta = {k: v for k, v in msg.meta.items() if k not in ("dead", "due", "tier")}
    meta.update({"domain": "one.test", "attempt": 0, "first_attempt": T + 900, "replayed_at": T + 900})
    return msg.with_(recipients=["x@one.test"], meta=meta)


def bench_delivery() -> Message:  # bench/replicas.py, straight onto delivery
    return Message(id="r1", sender="r@bench.test", recipients=["u1@d1.replicas.test"], received_at=T,
                   size=len(BODY), body=BODY, meta={"domain": "d1.replicas.test"})


# (name, today's record, typed parser, schema file, $defs pointer)
CASES = [
    ("api submission", api_submission, parse_submission, "submission.v1.json", ""),
    ("kafka submission", kafka_submission, parse_submission, "submission.v1.json", ""),
    ("bounce on admitted", bounce_local, parse_submission, "submission.v1.json", ""),
    ("inbox copy", local_inbox, parse_local, "local.v1.json", ""),
    ("sent copy (validate)", local_sent, parse_local, "local.v1.json", ""),
    ("sent copy (sentfolder)", sent_copy, parse_local, "local.v1.json", ""),
    ("outgoing", outgoing, parse_outgoing, "outgoing.v1.json", ""),
    ("clean", clean, parse_outgoing, "outgoing.v1.json", ""),
    ("clean, unscanned", clean_unscanned, parse_outgoing, "outgoing.v1.json", ""),
    ("delivery", delivery, parse_delivery, "delivery.v1.json", ""),
    ("bench delivery", bench_delivery, parse_delivery, "delivery.v1.json", ""),
    ("bounce on delivery", bounce_remote, parse_delivery, "delivery.v1.json", ""),
    ("retry.N", deferred, parse_deferred, "delivery.v1.json", "#/$defs/deferred"),
    ("retry.hold", held, parse_delivery, "delivery.v1.json", ""),
    ("released", released, parse_delivery, "delivery.v1.json", ""),
    ("dead", dead, parse_delivery, "delivery.v1.json", ""),
    ("replayed", replayed, parse_delivery, "delivery.v1.json", ""),
]


@pytest.mark.parametrize("name,make,parse,schema,pointer", CASES, ids=[c[0] for c in CASES])
def test_todays_records_round_trip_through_the_typed_records_unchanged(name, make, parse, schema, pointer):
    today = make().to_json()
    typed = parse(today)
    again = typed.to_json()
    # Same keys and values, meta included; the top-level key order is today's too.
    assert orjson.loads(again) == orjson.loads(today)
    assert list(orjson.loads(again)) == list(orjson.loads(today))
    # ... and the typed record's JSON reads back as today's Message, field by field.
    assert parse_message(again) == parse_message(today)
    assert parse(again) == typed
    validate(orjson.loads(today), schema, pointer)
    validate(orjson.loads(again), schema, pointer)


def test_typed_fields_carry_what_the_stages_read():
    d = parse_delivery(dead().to_json())
    assert (d.domain, d.dkim, d.dkim_rcpt, d.unsubscribe) == ("one.test", DKIM, {"x@one.test": DKIM,
                                                                                "y@two.test": DKIM}, LINKS | {
        "y@two.test": "https://mail.test/v1/unsubscribe/tok2"})
    assert (d.retry.attempt, d.retry.tier, d.retry.due, d.retry.first_attempt) == (1, 1, T + 61, T + 1)
    assert d.retry.dead == DeadLetter("permanent", T + 70, dead().meta["dead"]["failed"])
    # What Delivery does not type rides along untouched.
    assert d.meta_extra == {"summary": SUMMARY, "scan": clean().meta["scan"]}
    c = parse_outgoing(clean_unscanned().to_json())
    assert c.scan == ScanVerdict(False, "clamd: connection refused") and c.summary == SUMMARY
    assert parse_outgoing(clean().to_json()).scan == ScanVerdict(True, None, {"spam_score": 1.5,
                                                                              "spam_action": "no action"})
    loc = parse_local(local_inbox().to_json())
    assert (loc.mailbox, loc.folder, loc.body_ref, loc.body) == ("b@mailflow.test", "inbox", "messages/m1.eml", None)
    b = parse_submission(bounce_local().to_json())
    assert (b.sender, b.bounce, b.bounce_of, b.dkim, b.source) == ("", True, "m1", DKIM, "bounce")
    r = parse_delivery(replayed().to_json())
    assert (r.retry.attempt, r.retry.replayed_at, r.retry.due, r.retry.dead) == (0, T + 900, None, None)
    assert parse_delivery(bench_delivery().to_json()).retry == RetryState()


def test_unknown_keys_survive_every_typed_record():
    doc = orjson.loads(delivery().to_json())
    doc["meta"]["dashboard_tag"] = {"team": "x"}
    doc["trace"] = "abc"
    raw = orjson.dumps(doc)
    for parse in (parse_submission, parse_outgoing, parse_delivery):
        assert orjson.loads(parse(raw).to_json()) == doc
    loc = dict(doc, body_ref="messages/m1.eml", mailbox="a@mailflow.test", folder="sent")
    del loc["body"]
    assert orjson.loads(parse_local(orjson.dumps(loc)).to_json()) == loc


def test_moving_a_record_to_the_next_topic_keeps_every_key():
    sub = parse_submission(api_submission().to_json())
    out = sub.to(Outgoing, recipients=["x@one.test", "y@two.test"], summary=SUMMARY)
    assert out.unsubscribe == sub.unsubscribe
    assert out.to_json() == outgoing().to_json()  # byte for byte what validate writes today
    box = sub.to(LocalCopy, body=None, body_ref="messages/m1.eml", recipients=["b@mailflow.test"],
                 mailbox="b@mailflow.test", folder="inbox", summary=SUMMARY)
    assert orjson.loads(box.to_json()) == orjson.loads(local_inbox().to_json())
    cl = parse_outgoing(outgoing().to_json()).with_(scan=ScanVerdict(True, None, {"spam_score": 1.5,
                                                                                 "spam_action": "no action"}))
    assert cl.to_json() == clean().to_json()
    dl = parse_outgoing(signed().to_json()).to(Delivery, recipients=["x@one.test"], domain="one.test")
    assert orjson.loads(dl.to_json()) == orjson.loads(delivery().to_json())
    assert dl.dkim == DKIM and dl.meta_extra["summary"] == SUMMARY  # typed here, carried there
    # Back from Delivery to a lesser type: its retry state stays in meta_extra.
    back = parse_delivery(dead().to_json()).to(Outgoing)
    assert orjson.loads(back.to_json()) == orjson.loads(dead().to_json())
    # A change to a typed meta key wins over the key the record carried.
    moved = parse_delivery(deferred().to_json()).to(Delivery, retry=RetryState(attempt=0))
    assert orjson.loads(moved.to_json())["meta"].get("tier") is None
    with pytest.raises(PoisonPill):
        sub.to(LocalCopy, mailbox="b@mailflow.test", folder="inbox")  # inline body: not a local record


def test_retry_state_updates_as_the_deliver_stage_makes_them():
    d = parse_delivery(delivery().to_json())
    state = d.retry.with_(attempt=1, first_attempt=T + 1, last_error="451 4.7.1 try again later",
                          due=T + 61, tier=1,
                          history=d.retry.add_history({"ts": T + 1, "attempt": 1,
                                                       "error": "451 4.7.1 try again later"}))
    assert orjson.loads(d.with_(retry=state).to_json()) == orjson.loads(deferred().to_json())
    long = RetryState(history=[{"ts": float(i)} for i in range(40)])
    assert long.add_history({"ts": 99.0})[-1] == {"ts": 99.0} and len(long.add_history({"ts": 1.0})) == 30


# --------------------------------------------------------------------------- poison


def _doc(make: Any = delivery) -> dict[str, Any]:
    return orjson.loads(make().to_json())


def _with(make: Any = delivery, **meta: Any) -> bytes:
    d = _doc(make)
    d["meta"].update(meta)
    return orjson.dumps(d)


def _top(make: Any = delivery, **keys: Any) -> bytes:
    d = _doc(make)
    d.update(keys)
    return orjson.dumps({k: v for k, v in d.items() if v is not None})


# (parser, record, reason, schema, pointer): each is a poison pill AND fails its schema.
POISON = [
    (parse_delivery, _with(attempt="3"), "bad_field", "delivery.v1.json", ""),
    (parse_delivery, _with(attempt=True), "bad_field", "delivery.v1.json", ""),
    (parse_delivery, _with(due="soon"), "bad_field", "delivery.v1.json", ""),
    (parse_delivery, _with(history={"ts": 1}), "bad_field", "delivery.v1.json", ""),
    (parse_delivery, _with(dead={"ts": 1}), "bad_field", "delivery.v1.json", ""),
    (parse_delivery, _with(domain=""), "bad_field", "delivery.v1.json", ""),
    (parse_delivery, _with(dkim_rcpt={"x@one.test": 5}), "bad_field", "delivery.v1.json", ""),
    (parse_deferred, orjson.dumps({k: v for k, v in _doc(delivery).items()}), "bad_field",
     "delivery.v1.json", "#/$defs/deferred"),
    (parse_outgoing, _with(clean, scan={"spam_score": 1}), "bad_field", "outgoing.v1.json", ""),
    (parse_outgoing, _with(outgoing, summary={"subject": 1}), "bad_field", "outgoing.v1.json", ""),
    (parse_submission, _with(api_submission, unsubscribe=["x"]), "bad_field", "submission.v1.json", ""),
    (parse_submission, _with(api_submission, bounce="yes"), "bad_field", "submission.v1.json", ""),
    (parse_submission, _top(api_submission, version=2), "unsupported_version", "submission.v1.json", ""),
    (parse_submission, _top(api_submission, recipients=[]), "bad_field", "submission.v1.json", ""),
    (parse_submission, _top(api_submission, size=-1), "bad_field", "submission.v1.json", ""),
    (parse_submission, _top(api_submission, meta=[1]), "bad_field", "submission.v1.json", ""),
    (parse_submission, _top(api_submission, body=None), "bad_field", "submission.v1.json", ""),
    (parse_local, _top(local_inbox, folder="drafts"), "bad_field", "local.v1.json", ""),
    (parse_local, _top(local_inbox, mailbox=None), "bad_field", "local.v1.json", ""),
    (parse_local, _top(local_inbox, body="YWJj"), "bad_field", "local.v1.json", ""),
    (parse_local, _top(local_inbox, body_ref=None, body="YWJj"), "bad_field", "local.v1.json", ""),
]


@pytest.mark.parametrize("parse,raw,reason,schema,pointer", POISON)
def test_what_does_not_fit_is_a_poison_pill_and_fails_the_schema(parse, raw, reason, schema, pointer):
    with pytest.raises(PoisonPill) as err:
        parse(raw)
    assert err.value.reason == reason
    with pytest.raises(jsonschema.ValidationError):
        validate(orjson.loads(raw), schema, pointer)


@pytest.mark.parametrize("raw,reason", [(None, "empty_record"), (b"\xff", "not_json"), (b"[]", "not_an_object")])
def test_unreadable_records_are_poison_for_every_parser(raw, reason):
    for parse in (parse_submission, parse_local, parse_outgoing, parse_delivery, parse_deferred):
        with pytest.raises(PoisonPill) as err:
            parse(raw)
        assert err.value.reason == reason


def test_null_typed_keys_read_as_absent():
    d = parse_delivery(_with(held_at=None, attempt=None))
    assert d.retry.held_at is None and "held_at" not in d.meta and "held_at" not in d.meta_extra


# --------------------------------------------------------------------------- events and errors


def test_events_and_errors_as_the_stages_write_them_fit_their_schemas():
    # streams/runtime.py Outputs.event / park; mailflow/ops/replay.py's replayed event
    events = [Event(id="m1", state="deferred", stage="deliver", ts=T, recipients=["x@one.test"],
                    detail={"attempt": 1, "next_attempt_at": T + 60, "tier": 1, "error": "451"}, sender="a@x.test"),
              Event(id="m1", state="sent_folder", stage="store", ts=T, recipients=[], detail={"mailbox": "a"}),
              Event(id="m1", state="replayed", stage="replay", recipients=["x@one.test"], detail={"from": "dead"})]
    for ev in events:
        validate(orjson.loads(ev.to_json()), "event.v1.json")
        assert parse_event(ev.to_json()) == ev
    errors = [ErrorRecord(stage="validate", reason="bad_from_header", state="rejected", detail="no From",
                          id="m1", ts=T, record=outgoing().to_json().decode()),
              ErrorRecord(stage="status", reason="not_json", state="poison", ts=T, record="\ufffd")]
    for er in errors:
        validate(orjson.loads(er.to_json()), "error.v1.json")
        assert parse_error(er.to_json()) == er
    with pytest.raises(jsonschema.ValidationError):
        validate({"id": "m1", "recipients": "x", "state": "s", "stage": "s", "ts": 1}, "event.v1.json")
    with pytest.raises(jsonschema.ValidationError):
        validate({"stage": "s", "reason": "r", "state": "lost", "detail": "", "ts": 1}, "error.v1.json")


def test_an_event_batch_as_the_runtime_writes_it_fits_its_schema_and_parses_in_order():
    # streams/events.py EventBatcher: the events' JSON joined into one record
    events = [Event(id="m1", state="accepted", stage="ratelimit", ts=T, recipients=["x@one.test"], sender="a@x.test"),
              Event(id="m2", state="validated", stage="validate", ts=T + 1, recipients=["y@two.test"],
                    detail={"next": "scan"})]
    raw = b'{"events":[' + b",".join(ev.to_json() for ev in events) + b"]}"
    validate(orjson.loads(raw), "event-batch.v1.json")
    assert parse_events(raw) == events
    assert event_dicts(raw) == [orjson.loads(ev.to_json()) for ev in events]
    assert parse_events(events[0].to_json()) == events[:1]  # one event alone: as before
    assert event_dicts(events[0].to_json()) == [orjson.loads(events[0].to_json())]
    with pytest.raises(jsonschema.ValidationError):
        validate({"events": []}, "event-batch.v1.json")
    with pytest.raises(jsonschema.ValidationError):
        validate({"events": [{"id": "m1"}]}, "event-batch.v1.json")


@pytest.mark.parametrize("raw, reason", [
    (b'{"events": []}', "bad_field"),
    (b'{"events": {"id": "m1"}}', "bad_field"),
    (b'{"events": [1]}', "bad_field"),
    (b'{"events": [{"id": "m1", "state": "accepted", "stage": "x", "ts": 1}, {"id": "m2"}]}', "bad_field"),
    (b'{"events": [', "not_json"),
])
def test_an_event_batch_that_does_not_fit_is_poison_whole(raw: bytes, reason: str):
    with pytest.raises(PoisonPill) as caught:
        parse_events(raw)
    assert caught.value.reason == reason


# --------------------------------------------------------------------------- the schema files


def test_every_schema_file_is_a_2020_12_schema_with_its_id():
    assert set(SCHEMAS) == {"submission.v1.json", "local.v1.json", "outgoing.v1.json",
                            "delivery.v1.json", "event.v1.json", "event-batch.v1.json", "error.v1.json"}
    for name, schema in SCHEMAS.items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$id"] == f"https://mailflow.dev/schemas/{name}"


def test_the_envelope_and_meta_keys_are_written_once_in_meaning():
    # The files stand alone (no cross-file $ref, for readers without a registry), so
    # what they repeat must say the same everywhere.
    base = SCHEMAS["submission.v1.json"]["properties"]
    seen: dict[str, Any] = {}
    for name in ("submission.v1.json", "local.v1.json", "outgoing.v1.json", "delivery.v1.json"):
        props = SCHEMAS[name]["properties"]
        for k, v in base.items():
            if k not in ("meta", "recipients"):
                assert props[k] == v, (name, k)
        for k, v in props["meta"]["properties"].items():
            assert seen.setdefault(k, v) == v, (name, k)


@pytest.mark.parametrize("cls,name", [(Submission, "submission.v1.json"), (LocalCopy, "local.v1.json"),
                                      (Outgoing, "outgoing.v1.json"), (Delivery, "delivery.v1.json")])
def test_each_type_types_the_meta_keys_its_schema_describes(cls: type[MailRecord], name: str):
    typed = set(cls.META_KEYS) | (set(RetryState.KEYS) if cls is Delivery else set())
    assert typed == set(SCHEMAS[name]["properties"]["meta"]["properties"])


def test_local_folders_are_the_mailbox_folders():
    assert LOCAL_FOLDERS == mailbox.FOLDERS
    assert SCHEMAS["local.v1.json"]["properties"]["folder"]["enum"] == list(mailbox.FOLDERS)


def test_the_sentfolder_flow_in_typed_records_writes_todays_bytes():
    cl = parse_outgoing(clean().to_json())
    signed_ = cl.with_(dkim=DKIM, dkim_rcpt={r: DKIM for r in cl.unsubscribe or {}})
    assert orjson.loads(signed_.to_json()) == orjson.loads(signed().to_json())
    dl = signed_.to(Delivery, recipients=["x@one.test"], domain="one.test")
    assert orjson.loads(dl.to_json()) == orjson.loads(delivery().to_json())
    copy = signed_.with_(body=None, body_ref="messages/m1.eml").to(LocalCopy, mailbox=cl.sender, folder="sent")
    assert orjson.loads(copy.to_json()) == orjson.loads(sent_copy().to_json())
    # deliver's bounce for a local sender, and for a remote one
    b = Submission(id="b1", sender="", recipients=["a@mailflow.test"], received_at=T + 70, size=len(BODY),
                   body=BODY, source="bounce", bounce=True, bounce_of="m1", dkim=DKIM)
    assert b.to_json() == bounce_local().to_json()
    remote = b.to(Delivery, recipients=["app@ext.test"], domain="ext.test")
    assert orjson.loads(remote.to_json()) == orjson.loads(bounce_remote().to_json())
