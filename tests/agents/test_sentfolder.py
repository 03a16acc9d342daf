"""The sentfolder stage's handler as a function: a record in, its Outputs out."""

from __future__ import annotations

import dataclasses

import orjson

from agents import sentfolder
from schemas.records import parse_message


async def test_one_domain_keeps_its_body_inline_on_delivery(app, settings, make_message):
    handle = sentfolder.register(app, settings).handlers["clean"]
    msg = make_message(recipients=["bob@x.test", "dan@x.test"])
    out = await handle(msg.to_json())
    assert [t for t, _, _, _ in out.records] == ["delivery", "events"]
    key, value = out.sent("delivery")[0]
    rec = parse_message(value)
    assert key == b"x.test" and rec.body == msg.body and rec.meta["domain"] == "x.test"
    assert out.states() == [("sent_folder", ["bob@x.test", "dan@x.test"])]


async def test_a_local_sender_gets_a_sent_copy_and_each_domain_its_record(app, settings, make_message):
    handle = sentfolder.register(app, settings).handlers["clean"]
    msg = make_message(sender="alice@mailflow.local", recipients=["bob@x.test", "carol@y.test"])
    out = await handle(msg.to_json())
    assert [(t, k) for t, k, _, _ in out.records] == [
        ("local", b"alice@mailflow.local"), ("delivery", b"x.test"), ("delivery", b"y.test"),
        ("events", msg.id.encode())]
    copy = parse_message(out.sent("local")[0][1])
    assert (copy.folder, copy.mailbox, copy.body, bool(copy.body_ref)) == (
        "sent", "alice@mailflow.local", None, True)
    assert [parse_message(v).recipients for _, v in out.sent("delivery")] == [["bob@x.test"], ["carol@y.test"]]


async def test_dkim_required_without_a_key_parks_and_rejects(app, settings, make_message):
    handle = sentfolder.register(app, dataclasses.replace(settings, dkim="required")).handlers["clean"]
    msg = make_message()
    out = await handle(msg.to_json())
    assert [t for t, _, _, _ in out.records] == ["errors", "events"]
    assert orjson.loads(out.sent("errors")[0][1])["reason"] == "dkim_key_missing"
    assert out.states() == [("rejected", ["bob@x.test"])]
