"""The submission half on the real broker: ingress, ratelimit, validate, store, status."""

from __future__ import annotations

import os
import random
import signal
import time
from datetime import UTC, datetime
from email.utils import format_datetime

import orjson
import pytest
from confluent_kafka import Producer
from harness import FINAL, Broker, Stack, free_ports, http, wait_for

from mailflow.kafka_io import producer_config
from schemas.submission import make_submission


def raw_message(sender: str, to: list[str], subject: str, n: int) -> bytes:
    return (f"From: {sender}\r\nTo: {', '.join(to)}\r\nSubject: {subject}\r\n"
            f"Date: {format_datetime(datetime.now(UTC))}\r\nMessage-ID: <m{n}.{time.time_ns()}@t.test>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"body {n} {'x' * 200}\r\n").encode()


def count_records(stack: Stack, topic: str) -> int:
    return len(stack.read_topic(topic, timeout=3))


BAD_JSON_CASES = [
    (b"{not json", "application/json", 400, "bad_json"),
    (b'{"from": "a@mailflow.test", "to": "b@x.test", "text": "\xff\xfe"}', "application/json", 400, "bad_json"),
    (orjson.dumps({"to": "b@x.test", "text": "x"}), "application/json", 400, "from"),
    (orjson.dumps({"from": "nobody", "to": "b@x.test", "text": "x"}), "application/json", 400, "from"),
    (orjson.dumps({"from": "a@mailflow.test", "text": "x"}), "application/json", 400, "to"),
    (orjson.dumps({"from": "a@mailflow.test", "to": "b@", "text": "x"}), "application/json", 400, "to"),
    (orjson.dumps({"from": "a@mailflow.test", "to": 7, "text": "x"}), "application/json", 400, "to"),
    (orjson.dumps({"from": "a@mailflow.test", "to": [f"r{i}@x.test" for i in range(1001)], "text": "x"}),
     "application/json", 400, "to"),
    (orjson.dumps({"from": "a@mailflow.test", "to": "b@x.test", "subject": "hi\r\nBcc: v@x.test", "text": "x"}),
     "application/json", 400, "subject"),
    (orjson.dumps({"from": "Eve\r\nBcc: v@x.test <a@mailflow.test>", "to": "b@x.test", "text": "x"}),
     "application/json", 400, "from"),
    (orjson.dumps({"from": "a@mailflow.test", "to": "b@x.test", "text": "x", "headers": {"X-Y": "1\nBcc: v@x.test"}}),
     "application/json", 400, "headers.X-Y"),
    (orjson.dumps({"from": "a@mailflow.test", "to": "b@x.test", "text": "x", "priority": 1}),
     "application/json", 400, "priority"),
    (orjson.dumps({"from": "a@mailflow.test", "to": "b@x.test", "text": ["x"]}), "application/json", 400, "text"),
    (b"From: a@mailflow.test\r\nSubject: no recipients\r\n\r\nx", "message/rfc822", 400, "to"),
    (b"hello", "text/plain", 415, None),
]


def test_bad_input_gets_a_4xx_naming_the_field_and_nothing_enters_kafka(submission_stack: Stack):
    s = submission_stack
    before = count_records(s, "submissions")
    for body, ctype, status, field in BAD_JSON_CASES:
        code, doc, _ = s.submit(body, ctype=ctype)
        assert code == status, (body[:80], doc)
        assert "error" in doc and doc["error"]["message"]
        if field and field not in ("bad_json",):
            assert field in doc["error"].get("fields", {}), (field, doc)
        if field == "bad_json":
            assert doc["error"]["code"] == "bad_json"
    # Oversize: refused from Content-Length, before the body is read.
    limit = s.settings().max_message_bytes
    big = orjson.dumps({"from": "a@mailflow.test", "to": "b@x.test", "text": "x" * (limit * 4 // 3 + 70000)})
    code, doc, _ = s.submit(big)
    assert code == 413 and doc["error"]["code"] == "too_large"
    assert count_records(s, "submissions") == before


def test_two_hundred_mixed_submissions_each_reach_one_state(submission_stack: Stack):
    s = submission_stack
    rnd = random.Random(7)
    sent: dict[str, dict] = {}  # id -> what we expect
    # 150 through HTTP as raw messages: local, remote, mixed, from many senders.
    for n in range(150):
        sender = f"user{n % 40}@mailflow.test"
        kind = rnd.choice(["local", "remote", "mixed"])
        to = {"local": [f"box{n % 7}@mailflow.test"], "remote": [f"peer{n}@remote.test"],
              "mixed": [f"box{n % 5}@local.test", f"peer{n}@elsewhere.test"]}[kind]
        raw = raw_message(sender, to, f"mixed {n}", n)
        code, doc, _ = s.submit(raw, ctype="message/rfc822")
        assert code == 202, doc
        sent[doc["id"]] = {"to": to, "raw": raw}
    # 25 over the rate limit (20 per hour for one sender): some refused with 429 at
    # the door once the stage has said so, the others parked as rate_limited.
    throttled = 0
    for n in range(25):
        code, doc, hdrs = s.submit({"from": "busy@mailflow.test", "to": "x@remote.test", "text": f"{n}"})
        if code == 429:
            assert int(hdrs["Retry-After"]) > 0 and doc["error"]["code"] == "rate_limited"
            throttled += 1
        else:
            assert code == 202
            sent[doc["id"]] = {"to": ["x@remote.test"], "limited": True}
        time.sleep(0.05)
    # 25 produced straight to Kafka that the validator must reject.
    p = Producer(producer_config(s.env["MAILFLOW_KAFKA_BOOTSTRAP"]))
    for n in range(25):
        bad = b"To: x@remote.test\r\nSubject: no From header\r\n\r\nbody"
        msg_id, value = make_submission(bad, sender=f"direct{n}@mailflow.test", recipients=["x@remote.test"])
        p.produce(f"{s.prefix}submissions", key=f"direct{n}@mailflow.test".encode(), value=value)
        sent[msg_id] = {"to": ["x@remote.test"], "invalid": True}
    p.produce(f"{s.prefix}submissions", key=b"poison", value=b"\x00not json at all")
    assert p.flush(10) == 0

    def settled() -> bool:
        for msg_id, exp in sent.items():
            st = s.status(msg_id)
            if st is None or set(st["recipients"]) != set(exp["to"]):
                return False
            for rcpt, r in st["recipients"].items():
                if r["state"] not in FINAL and not (r["state"] == "validated" and not rcpt.endswith(("mailflow.test", "local.test"))):
                    return False
        return True

    wait_for(settled, 120, interval=1.0, what="every recipient to settle")
    states: dict[str, int] = {}
    for msg_id, exp in sent.items():
        st = s.status(msg_id)
        for rcpt, r in st["recipients"].items():
            states[r["state"]] = states.get(r["state"], 0) + 1
            if exp.get("invalid"):
                assert r["state"] == "rejected" and r["detail"]["reason"] == "bad_from_header"
            elif exp.get("limited"):
                assert r["state"] in ("rate_limited", "validated")
            elif rcpt.endswith(("@mailflow.test", "@local.test")):
                assert r["state"] == "stored", (msg_id, st)
            else:  # remote mail waits on `outgoing` until the scanner takes it
                assert r["state"] == "validated" and r["waiting_on"].startswith("scan")
    limited = [i for i, e in sent.items() if e.get("limited")]
    assert throttled + len(limited) == 25
    assert sum(1 for i in limited if s.status(i)["recipients"]["x@remote.test"]["state"] == "validated") <= 20
    assert throttled > 0 or any(s.status(i)["recipients"]["x@remote.test"]["state"] == "rate_limited" for i in limited)
    # Local mail reads back through the REST API with the exact bytes sent.
    checked = 0
    for msg_id, exp in sent.items():
        local = [r for r in exp["to"] if r.endswith(("@mailflow.test", "@local.test"))]
        if "raw" not in exp or not local:
            continue
        code, body, _ = http("GET", f"{s.api}/v1/mailboxes/{local[0]}/messages/{msg_id}/raw")
        assert code == 200 and body == exp["raw"]
        checked += 1
    assert checked > 50
    # The remote part is visible as lag on the scanner's input.
    from mailflow.ops.lag import measure

    scan = next(x for x in measure(s.settings(), ["scan"]))
    waiting = sum(1 for e in sent.values() if "raw" in e and any(not r.endswith(("mailflow.test", "local.test")) for r in e["to"]))
    assert scan.total >= waiting
    # The poison pill went to errors with a reason, and the stage carried on.
    errors = [orjson.loads(v) for _, v in s.read_topic("errors")]
    assert any(e["state"] == "poison" and e["reason"] == "not_json" for e in errors)
    assert sum(1 for e in errors if e["reason"] == "bad_from_header") == 25


def test_mailbox_listing_pages_newest_first(submission_stack: Stack):
    s = submission_stack
    ids = []
    for n in range(12):
        code, doc, _ = s.submit({"from": f"pager{n}@remote.test", "to": "pages@mailflow.test",
                                 "subject": f"page {n}", "text": "x"})
        assert code == 202
        ids.append(doc["id"])
    wait_for(lambda: s.mailbox("pages@mailflow.test")["total"] == 12, 60, what="12 stored")
    seen, stored_at, cursor = [], [], None
    while True:
        page = s.mailbox("pages@mailflow.test", limit=5, **({"cursor": cursor} if cursor else {}))
        assert len(page["messages"]) <= 5
        seen += [m["id"] for m in page["messages"]]
        stored_at += [m["stored_at"] for m in page["messages"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    # Newest first by arrival in the mailbox; submissions on different partitions
    # may arrive in another order than they were sent.
    assert sorted(seen) == sorted(ids) and len(seen) == 12
    assert stored_at == sorted(stored_at, reverse=True)
    code, doc, _ = http("GET", f"{s.api}/v1/mailboxes/pages@mailflow.test/messages/{ids[0]}")
    assert code == 200 and doc["subject"] == "page 0" and doc["text"].strip() == "x"
    code, doc, _ = http("GET", f"{s.api}/v1/mailboxes/pages@mailflow.test/messages/nope")
    assert code == 400 and "id" in doc["error"]["fields"]  # not an id: refused before the store
    from mailflow.ids import new_id

    code, doc, _ = http("GET", f"{s.api}/v1/mailboxes/pages@mailflow.test/messages/{new_id()}")
    assert code == 404


def test_store_killed_mid_batch_loses_nothing_and_stores_nothing_twice(submission_stack: Stack):
    s = submission_stack
    box = "crash@mailflow.test"
    ids = []
    for n in range(300):
        code, doc, _ = s.submit(raw_message(f"k{n % 30}@remote.test", [box], f"crash {n}", n),
                                ctype="message/rfc822")
        assert code == 202
        ids.append(doc["id"])
        if n == 100:
            s.kill("store", signal.SIGKILL)
    s.start_stage("store")

    def total() -> int:
        code, body, _ = http("GET", f"{s.api}/v1/mailboxes/{box}/messages?limit=1")
        return body["total"] if code == 200 else 0  # 503 while the store restarts

    wait_for(lambda: total() >= 300, 180, interval=1, what="300 stored")
    time.sleep(2)  # anything replayed after the restart would land now
    listing = s.mailbox(box, limit=500)
    got = [m["id"] for m in listing["messages"]]
    assert listing["total"] == 300 and len(got) == 300
    assert sorted(got) == sorted(ids)


def test_broker_down_answers_503_and_recovers(tmp_path):
    port = free_ports(2)  # below the ephemeral range: the broker is started again on it
    broker = Broker(tmp_path, port, port + 1)
    broker.start()
    stack = Stack(tmp_path / "stacks", broker.bootstrap)
    try:
        stack.start([])
        doc = {"from": "a@mailflow.test", "to": "b@remote.test", "text": "x"}
        assert stack.submit(doc)[0] == 202
        broker.stop(kill=True)
        started = time.monotonic()
        code, body, hdrs = stack.submit(doc)
        assert code == 503 and body["error"]["code"] == "broker_unavailable", body
        assert time.monotonic() - started < 20
        assert http("GET", f"{stack.api}/readyz")[0] == 503
        # A careful client's request (Idempotency-Key) is refused as fast: its key
        # cannot be checked, and waiting on it must not hold the client.
        idem = {"Idempotency-Key": "order-during-outage"}
        started = time.monotonic()
        code, body, hdrs = stack.submit(doc, headers=idem)
        assert code == 503 and body["error"]["code"] == "broker_unavailable", body
        assert hdrs["Retry-After"] == "5"
        assert time.monotonic() - started < 5
        broker.start()
        wait_for(lambda: stack.submit(doc)[0] == 202, 90, interval=1, what="accepting again")
        assert http("GET", f"{stack.api}/readyz")[0] == 200
        code, first, _ = stack.submit(doc, headers=idem)
        assert code == 202
        code, again, hdrs = stack.submit(doc, headers=idem)
        assert code == 202 and again["id"] == first["id"] and hdrs.get("Idempotent-Replayed") == "true"
    finally:
        stack.stop()
        broker.stop()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # urllib would send loopback requests through a proxy from the environment.
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(k, raising=False)
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
