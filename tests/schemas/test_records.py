import jsonschema
import orjson
import pytest

from schemas.records import Message, PoisonPill, parse_event, parse_message
from schemas.submission import json_schema, make_submission


def test_roundtrip():
    m = Message(id="x1", sender="a@x.test", recipients=["b@y.test"], received_at=1.5, size=3, body=b"abc")
    back = parse_message(m.to_json())
    assert (back.id, back.body, back.recipients) == ("x1", b"abc", ["b@y.test"])


@pytest.mark.parametrize("raw,reason", [
    (b"\xff\xfe", "not_json"),
    (b"[1,2]", "not_an_object"),
    (b'{"version": 9}', "unsupported_version"),
    (b'{"version":1,"id":"a","sender":"s@x","recipients":[],"received_at":1,"size":1,"body":""}', "bad_field"),
    (b'{"version":1,"id":"a","sender":"s@x","recipients":["r@x"],"received_at":1,"size":1}', "bad_field"),
    (b'{"version":1,"id":"a","sender":"s@x","recipients":["r@x"],"received_at":1,"size":1,"body":"%%"}', "bad_field"),
    (None, "empty_record"),
])
def test_poison(raw, reason):
    with pytest.raises(PoisonPill) as err:
        parse_message(raw)
    assert err.value.reason == reason


def test_helper_output_fits_the_published_schema():
    msg_id, value = make_submission(b"From: a@x.test\r\n\r\nhi", sender="a@x.test", recipients=["b@y.test"])
    doc = orjson.loads(value)
    jsonschema.validate(doc, json_schema())
    assert doc["id"] == msg_id and parse_message(value).body == b"From: a@x.test\r\n\r\nhi"
    bad = dict(doc)
    del bad["recipients"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json_schema())


def test_event_parse():
    e = parse_event(b'{"id":"m","state":"stored","stage":"store","ts":2,"recipients":["a@x"]}')
    assert (e.state, e.recipients) == ("stored", ["a@x"])
    with pytest.raises(PoisonPill):
        parse_event(b'{"id":"m","recipients":"a@x","state":"s"}')
