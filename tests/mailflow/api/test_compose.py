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


# ---- issue 19 ---------------------------------------------------------------------------
SEPARATORS = ["\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\0"]


@pytest.mark.parametrize("sep", SEPARATORS)
def test_every_line_separator_in_a_header_bound_input_is_refused_by_name(sep):
    base = {"from": "a@x.test", "to": "b@y.test", "text": "x"}
    att = {"filename": f"a{sep}b.txt", "content_base64": "eA=="}
    for doc, field in (({**base, "subject": f"hi{sep}Bcc: e@z.test"}, "subject"),
                       ({**base, "headers": {"X-A": f"1{sep}2"}}, "headers.X-A"),
                       ({**base, "attachments": [att]}, "attachments[0].filename"),
                       ({**base, "from": f"Eve{sep}Boss <a@x.test>"}, "from"),
                       ({**base, "to": f"b@y.test{sep}"}, "to")):
        with pytest.raises(InputError) as err:
            compose(doc)
        assert field in err.value.fields, (sep, field, err.value.fields)


@pytest.mark.parametrize("addr", ['"john doe"@y.test', 'Bob <"john doe"@y.test>', '"a\\"b"@y.test',
                                  "x@xn--bcher-kva.test", "ü@bücher.test", "a.b+c@y.test", '"x@z"@y.test'])
def test_json_addresses_reach_the_headers_as_given(addr):
    from email.utils import getaddresses

    from mailflow.rules.mailrules import normalize_address, parse_headers

    c = compose({"from": addr, "to": addr, "cc": [addr], "reply_to": addr, "text": "x"})
    want = normalize_address(getaddresses([addr])[0][1])
    assert c.sender == want and c.recipients == [want]
    headers = parse_headers(c.raw)
    for name in ("From", "To", "Cc", "Reply-To"):
        assert getaddresses([str(headers[name])])[0][1] == want, (name, headers[name])
    # SMTPUTF8 only when the address needs it: an A-label domain stays ASCII.
    assert c.extra["smtputf8"] == (not want.isascii())
    assert (b"xn--bcher-kva" in c.raw) == ("xn--" in addr)


@pytest.mark.parametrize("field", ["from", "to", "reply_to"])
def test_an_encoded_word_is_never_an_address(field):
    doc = {"from": "a@x.test", "to": "b@y.test", "text": "x",
           field: "=?utf-8?b?Y2VvQGZvcmVpZ24udGVzdA==?=@x.test"}
    with pytest.raises(InputError) as err:
        compose(doc)
    assert field in err.value.fields and "encoded word" in err.value.fields[field]


@pytest.mark.parametrize("raw,field,words", [
    (b"From: a@x.test\r\nTo: b@y.test\r\nSubject: t\r\nFrom : ceo@f.test\r\n\r\nb\r\n", "from", "blanks before"),
    (b"From : ceo@f.test\r\nFrom: a@x.test\r\nTo: b@y.test\r\n\r\nb\r\n", "from", "2 From fields"),
    (b"From: a@x.test\r\nFrom: ceo@f.test\r\nTo: b@y.test\r\n\r\nb\r\n", "from", "2 From fields"),
    (b"From: a@x.test\r\nTo: b@y.test\r\nSubject\t: t\r\n\r\nb\r\n", "headers", "blanks before"),
    (b"From: a@x.test\r\nTo: b@y.test\r\nnot a field\r\n\r\nb\r\n", "headers", "neither a field"),
    (b" folded: x\r\nFrom: a@x.test\r\nTo: b@y.test\r\n\r\nb\r\n", "headers", "continuation"),
    (b"From: \xffrob@x.test\r\nTo: b@y.test\r\n\r\nb\r\n", "from", "not valid UTF-8"),
    (b"From: a@x.test\r\nTo: b\xfe@y.test\r\n\r\nb\r\n", "to", "not valid UTF-8"),
    (b"From: =?utf-8?b?Y2Vv?=@x.test\r\nTo: b@y.test\r\n\r\nb\r\n", "from", "encoded word"),
    (b"From: a@x.test\r\nTo: b@y.test\r\nSubject: 1\r\nSubject: 2\r\n\r\nb\r\n", "headers", "2 Subject"),
])
def test_raw_headers_the_policy_cannot_read_unambiguously_are_refused(raw, field, words):
    with pytest.raises(InputError) as err:
        prepare_raw(raw, message_id="<m@x>", date=NOW, env_from=None, env_to=None, max_recipients=10)
    assert err.value.code == "bad_headers"
    assert words in err.value.fields[field], err.value.fields


def test_raw_keeps_encoded_display_names_and_strips_receiver_trace_fields():
    raw = (b"Return-Path: <bounce@f.test>\r\nFrom: =?utf-8?q?B=C3=B6b?= <a@x.test>\r\nTo: b@y.test\r\n"
           b"Authentication-Results: mx.f.test; dkim=pass\r\n header.d=f.test\r\nSubject: s\r\n"
           b"DKIM-Signature: v=1; d=x.test; s=k; b=abc\r\nAuthentication-Results: other; spf=pass\r\n\r\nbody\r\n")
    c = prepare_raw(raw, message_id="<m@x>", date=NOW, env_from=None, env_to=None, max_recipients=10)
    head = c.raw.split(b"\r\n\r\n")[0]
    assert b"Return-Path" not in head and b"Authentication-Results" not in head and b"header.d" not in head
    assert b"From: =?utf-8?q?B=C3=B6b?= <a@x.test>\r\n" in head and b"DKIM-Signature: v=1" in head
    assert c.raw.endswith(b"Subject: s\r\nDKIM-Signature: v=1; d=x.test; s=k; b=abc\r\n\r\nbody\r\n")


def test_json_headers_cannot_name_a_sender_or_a_receivers_verdict():
    for name in ("Resent-From", "Resent-Sender", "Authentication-Results", "Return-Path"):
        with pytest.raises(InputError) as err:
            compose({"from": "a@x.test", "to": "b@y.test", "text": "x", "headers": {name: "c@f.test"}})
        assert f"headers.{name}" in err.value.fields


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
