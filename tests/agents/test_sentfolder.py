"""The sentfolder stage's handler as a function: a record in, its Outputs out."""

from __future__ import annotations

import dataclasses

import orjson

from agents import sentfolder
from schemas.mail import Outgoing, parse_delivery, parse_local


async def test_one_domain_keeps_its_body_inline_on_delivery(app, settings, make_message):
    handle = sentfolder.register(app, settings).handlers["clean"]
    msg = make_message(kind=Outgoing, recipients=["bob@x.test", "dan@x.test"])
    out = await handle(msg.to_json())
    assert [t for t, _, _, _ in out.records] == ["delivery", "events"]
    key, value = out.sent("delivery")[0]
    rec = parse_delivery(value)
    assert key == b"x.test" and rec.body == msg.body and rec.domain == "x.test"
    assert rec.recipients == ["bob@x.test", "dan@x.test"] and rec.dkim is None  # no key: unsigned
    assert out.states() == [("sent_folder", ["bob@x.test", "dan@x.test"])]


async def test_a_local_sender_gets_a_sent_copy_and_each_domain_its_record(app, settings, make_message):
    handle = sentfolder.register(app, settings).handlers["clean"]
    msg = make_message(kind=Outgoing, sender="alice@mailflow.local", recipients=["bob@x.test", "carol@y.test"])
    out = await handle(msg.to_json())
    assert [(t, k) for t, k, _, _ in out.records] == [
        ("local", b"alice@mailflow.local"), ("delivery", b"x.test"), ("delivery", b"y.test"),
        ("events", msg.id.encode())]
    copy = parse_local(out.sent("local")[0][1])
    assert (copy.folder, copy.mailbox, copy.body, bool(copy.body_ref)) == (
        "sent", "alice@mailflow.local", None, True)
    assert copy.recipients == msg.recipients
    deliveries = [parse_delivery(v) for _, v in out.sent("delivery")]
    assert [(d.recipients, d.domain) for d in deliveries] == [(["bob@x.test"], "x.test"),
                                                              (["carol@y.test"], "y.test")]
    assert all(d.body is None and d.body_ref == copy.body_ref for d in deliveries)  # put once


async def test_dkim_required_without_a_key_parks_and_rejects(app, settings, make_message):
    handle = sentfolder.register(app, dataclasses.replace(settings, dkim="required")).handlers["clean"]
    msg = make_message(kind=Outgoing)
    out = await handle(msg.to_json())
    assert [t for t, _, _, _ in out.records] == ["errors", "events"]
    assert orjson.loads(out.sent("errors")[0][1])["reason"] == "dkim_key_missing"
    assert out.states() == [("rejected", ["bob@x.test"])]


class FakeSigner:
    """Signs everything: the lines name the bytes signed, so a test can tell whose they are."""

    def __init__(self, settings: object) -> None:
        pass

    async def sign(self, message: bytes) -> tuple[bytes, dict[str, object]]:
        unsub = b"List-Unsubscribe: " in message.split(b"\r\n\r\n", 1)[0]
        return (b"DKIM-Signature: per\r\n" if unsub else b"DKIM-Signature: all\r\n"), {"signed": True}


async def test_signed_mail_carries_its_signature_and_one_per_unsubscribe_recipient(
        app, settings, make_message, monkeypatch):
    monkeypatch.setattr(sentfolder, "Signer", FakeSigner)
    handle = sentfolder.register(app, settings).handlers["clean"]
    msg = make_message(kind=Outgoing, recipients=["bob@x.test", "dan@x.test"],
                       unsubscribe={"bob@x.test": "<https://u.test/1>"})
    out = await handle(msg.to_json())
    (key, value), = out.sent("delivery")
    rec = parse_delivery(value)
    assert (key, rec.dkim, rec.dkim_rcpt) == (b"x.test", "DKIM-Signature: all\r\n",
                                              {"bob@x.test": "DKIM-Signature: per\r\n"})
    assert rec.unsubscribe == {"bob@x.test": "<https://u.test/1>"} and rec.body == msg.body
    assert orjson.loads(out.sent("events")[0][1])["detail"]["dkim"] == {"signed": True}
