"""The store stage's handler as a function: a `local` record in, its table writes and
event out; applied by the runtime, a second run of the record writes nothing."""

from __future__ import annotations

import pytest

from agents import store
from mailflow.rules import mailbox as mb
from schemas.mail import LocalCopy, Submission
from schemas.records import PoisonPill


async def test_an_inbox_copy_is_appended_once_and_stored(app, settings, make_message, one_partition, producer):
    stage = store.register(app, settings)
    stage._producer = producer  # type: ignore[assignment]
    table = app.tables["mailboxes"]
    one_partition(table)
    handle = stage.handlers["local"]
    msg = make_message(kind=LocalCopy, sender="bob@x.test", recipients=["Demo@mailflow.local"],
                       body=None, body_ref="bodies/x", mailbox="demo@mailflow.local", folder="inbox",
                       summary={"subject": "hi", "from": "bob@x.test", "has_attachments": False})
    out = await handle(msg.to_json())
    keys = [k for _, k, _, _ in out.writes]
    assert mb.meta_key("demo@mailflow.local", "inbox", msg.id) in keys
    assert keys[-1] == mb.page_key("demo@mailflow.local", "inbox", 0)  # the page last
    assert out.states() == [("stored", ["Demo@mailflow.local"])]
    assert table.get(keys[0]) is None  # nothing written by the handler itself
    (_, key, meta, _), = [w for w in out.writes if w[1] == mb.meta_key("demo@mailflow.local", "inbox", msg.id)]
    meta = dict(meta)
    assert meta.pop("stored_at") > 0
    assert meta == {"id": msg.id, "folder": "inbox", "sender": "bob@x.test",  # the summary flattened in
                    "recipients": ["Demo@mailflow.local"], "received_at": msg.received_at,
                    "size": msg.size, "body_ref": "bodies/x", "subject": "hi", "from": "bob@x.test",
                    "has_attachments": False, "pos": 0}

    await stage.process(msg.to_json(), handle)  # the runtime applies and sends them
    assert mb.list_ids(table, "demo@mailflow.local", "inbox", 10, None)[0] == [msg.id]
    again = await handle(msg.to_json())  # a replay: listed already
    assert again.writes == [] and again.states() == [("stored", ["Demo@mailflow.local"])]


async def test_a_sent_copy_says_sent_folder(app, settings, make_message):
    handle = store.register(app, settings).handlers["local"]
    msg = make_message(kind=LocalCopy, sender="alice@mailflow.local", body=None,
                       body_ref="bodies/y", mailbox="alice@mailflow.local", folder="sent")
    out = await handle(msg.to_json())
    assert out.states() == [("sent_folder", [])]


async def test_a_local_record_without_its_mailbox_is_poison(app, settings, make_message):
    handle = store.register(app, settings).handlers["local"]
    with pytest.raises(PoisonPill):
        await handle(make_message(kind=Submission, body=None, body_ref="bodies/z").to_json())
