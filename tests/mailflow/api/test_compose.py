import base64
from datetime import UTC, datetime
from email import message_from_bytes, policy

import pytest

from mailflow.api.compose import InputError, compose_json, prepare_raw

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def compose(doc):
    return compose_json(doc, message_id="<id1@mf.test>", date=NOW, max_recipients=5)


def test_text_html_attachment_is_multipart_and_bcc_hidden():
    c = compose({"from": "Alice <alice@x.test>", "to": ["bob@y.test"], "cc": "carol@y.test",
                 "bcc": ["dave@z.test"], "subject": "Hi ✓", "text": "plain", "html": "<p>html</p>",
                 "headers": {"X-Campaign": "7"},
                 "attachments": [{"filename": "a.txt", "content_type": "text/plain",
                                  "content_base64": base64.b64encode(b"att").decode()}]})
    assert c.sender == "alice@x.test"
    assert c.recipients == ["bob@y.test", "carol@y.test", "dave@z.test"]
    msg = message_from_bytes(c.raw, policy=policy.default)
    assert msg.get_content_type() == "multipart/mixed"
    assert msg["Subject"] == "Hi ✓"
    assert msg["Message-ID"] == "<id1@mf.test>"
    assert msg["X-Campaign"] == "7"
    assert msg["Bcc"] is None and b"dave@z.test" not in c.raw
    body = msg.get_body(("plain",))
    assert body.get_content().strip() == "plain"
    assert [p.get_filename() for p in msg.iter_attachments()] == ["a.txt"]
    assert b"\r\n" in c.raw


@pytest.mark.parametrize("doc,field", [
    ({"to": "b@y.test", "text": "x"}, "from"),
    ({"from": "not-an-address", "to": "b@y.test", "text": "x"}, "from"),
    ({"from": "a@x.test", "text": "x"}, "to"),
    ({"from": "a@x.test", "to": ["b@y.test", 3], "text": "x"}, "to"),
    ({"from": "a@x.test", "to": "b@y.test", "subject": "a\r\nBcc: evil@z.test", "text": "x"}, "subject"),
    ({"from": "Eve\n <a@x.test>", "to": "b@y.test", "text": "x"}, "from"),
    ({"from": "a@x.test", "to": "b@y.test", "headers": {"X-A": "1\nBcc: e@z.test"}, "text": "x"}, "headers.X-A"),
    ({"from": "a@x.test", "to": "b@y.test", "headers": {"Bcc": "e@z.test"}, "text": "x"}, "headers.Bcc"),
    ({"from": "a@x.test", "to": "b@y.test", "headers": {"Bad Name": "v"}, "text": "x"}, "headers.Bad Name"),
    ({"from": "a@x.test", "to": "b@y.test", "text": "x", "colour": "red"}, "colour"),
    ({"from": "a@x.test", "to": "b@y.test", "text": 5}, "text"),
    ({"from": "a@x.test", "to": "b@y.test"}, "text"),
    ({"from": "a@x.test", "to": [f"r{i}@y.test" for i in range(6)], "text": "x"}, "to"),
    ({"from": "a@x.test", "to": "b@y.test", "attachments": [{"filename": "a", "content_base64": "!!"}]},
     "attachments[0].content_base64"),
])
def test_bad_input_names_the_field(doc, field):
    with pytest.raises(InputError) as err:
        compose(doc)
    assert field in err.value.fields


def test_raw_keeps_bytes_adds_ids_and_strips_bcc():
    raw = b"From: a@x.test\r\nTo: b@y.test\r\nBcc: hidden@z.test,\r\n other@z.test\r\nSubject: s\r\n\r\nbody\r\n"
    c = prepare_raw(raw, message_id="<m@mf.test>", date=NOW, env_from=None, env_to=None, max_recipients=10)
    assert c.sender == "a@x.test"
    assert c.recipients == ["b@y.test", "hidden@z.test", "other@z.test"]
    assert c.raw.startswith(b"Message-ID: <m@mf.test>\r\nDate: ")
    assert b"hidden@z.test" not in c.raw and b"other@z.test" not in c.raw
    assert c.raw.endswith(b"To: b@y.test\r\nSubject: s\r\n\r\nbody\r\n")


def test_raw_envelope_override_and_errors():
    raw = b"From: a@x.test\r\nMessage-ID: <keep@x>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nb"
    c = prepare_raw(raw, message_id="<m@mf.test>", date=NOW, env_from="bounce@x.test",
                    env_to=["r@y.test"], max_recipients=10)
    assert (c.sender, c.recipients, c.raw) == ("bounce@x.test", ["r@y.test"], raw)
    with pytest.raises(InputError) as err:
        prepare_raw(b"From: a@x.test\r\n\r\nno recipients", message_id="<m@x>", date=NOW,
                    env_from=None, env_to=None, max_recipients=10)
    assert "to" in err.value.fields
    with pytest.raises(InputError):
        prepare_raw(b"", message_id="<m@x>", date=NOW, env_from=None, env_to=None, max_recipients=10)


def test_unsubscribe_flag() -> None:
    base = {"from": "a@x.test", "to": "b@y.test", "text": "x"}
    assert compose({**base, "unsubscribe": True}).extra["unsubscribe"] is True
    assert compose(base).extra["unsubscribe"] is False
    with pytest.raises(InputError) as e:
        compose({**base, "unsubscribe": "yes"})
    assert "unsubscribe" in e.value.fields
    with pytest.raises(InputError) as e:
        compose({**base, "unsubscribe": True, "headers": {"List-Unsubscribe": "<https://evil>"}})
    assert "headers.List-Unsubscribe" in e.value.fields
