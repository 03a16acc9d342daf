"""The validate stage's handler as a function: a record in, its Outputs out."""

from __future__ import annotations

import dataclasses

import orjson

from agents import validate
from mailflow.rules.mailrules import summarize
from schemas.mail import parse_local, parse_outgoing


async def test_remote_mail_goes_to_outgoing_with_a_validated_event(app, settings, make_message):
    handle = validate.register(app, settings).handlers["admitted"]
    msg = make_message(recipients=["bob@x.test", "carol@y.test"])
    out = await handle(msg.to_json())
    assert [t for t, _, _, _ in out.records] == ["outgoing", "events"]
    (key, value), = out.sent("outgoing")
    assert key == msg.id.encode()
    rec = parse_outgoing(value)
    assert rec.recipients == ["bob@x.test", "carol@y.test"] and rec.body == msg.body
    assert rec.summary == summarize(msg.body) and rec.summary["subject"] == "hi"
    assert out.states() == [("validated", ["bob@x.test", "carol@y.test"])]
    assert not out.writes and out.retry is None


async def test_local_and_remote_mail_goes_both_ways_one_copy_per_mailbox(app, settings, make_message):
    handle = validate.register(app, settings).handlers["admitted"]
    msg = make_message(sender="alice@mailflow.local",
                  recipients=["Demo@mailflow.local", "demo@mailflow.local", "bob@x.test"])
    out = await handle(msg.to_json())
    local = [(k, parse_local(v)) for k, v in out.sent("local")]
    # One inbox copy naming both spellings of one mailbox, and the sender's Sent copy.
    assert [(k, m.folder, m.recipients) for k, m in local] == [
        (b"demo@mailflow.local", "inbox", ["Demo@mailflow.local", "demo@mailflow.local"]),
        (b"alice@mailflow.local", "sent", msg.recipients)]
    assert all(m.body is None and m.body_ref for _, m in local)  # by reference, put once
    assert len({m.body_ref for _, m in local}) == 1
    assert all(m.summary and m.summary["subject"] == "hi" for _, m in local)
    assert [k for k, _ in out.sent("outgoing")] == [msg.id.encode()]
    assert parse_outgoing(out.sent("outgoing")[0][1]).recipients == ["bob@x.test"]


async def test_invalid_mail_is_parked_and_rejected(app, settings, make_message):
    handle = validate.register(app, dataclasses.replace(settings, max_message_bytes=10)).handlers["admitted"]
    msg = make_message()
    out = await handle(msg.to_json())
    assert [t for t, _, _, _ in out.records] == ["errors", "events"]
    parked = orjson.loads(out.sent("errors")[0][1])
    assert (parked["reason"], parked["state"], parked["stage"]) == ("too_large", "rejected", "validate")
    assert out.states() == [("rejected", ["bob@x.test"])]
