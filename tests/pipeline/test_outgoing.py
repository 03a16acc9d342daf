"""The outgoing half with real Kafka, clamd, rspamd and SMTP peers."""

from __future__ import annotations

import base64
import io
import re
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer
from harness import ScriptedPeer, Stack, http, settled, wait_for

from devtools.services import EICAR
from mailflow.kafka_io import producer_config
from schemas.records import Message

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@pytest.fixture(scope="module")
def peers() -> Iterator[tuple[ScriptedPeer, ScriptedPeer]]:
    a, b = ScriptedPeer().start(), ScriptedPeer().start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def full_stack(kafka: str, work_dir: Path, scanners: None, peers) -> Iterator[Stack]:
    a, b = peers
    # Domains d0..d9.out.test go to peer b, everything else to peer a.
    routes = ",".join([f"d{i}.out.test=127.0.0.1:{b.port}" for i in range(10)] + [f"*=127.0.0.1:{a.port}"])
    stack = Stack(work_dir, kafka, smtp_routes=routes, retry_schedule="300ms,600ms",
                  rate_limit="100000/60s", max_queue_age="1h")
    try:
        yield stack.start(["ratelimit", "validate", "store", "scan", "sentfolder", "deliver",
                           "retry", "status"])
    finally:
        stack.stop()


def test_clean_message_is_delivered_and_in_sent(full_stack: Stack, peers):
    s, (a, _) = full_stack, peers
    raw = (b"From: Alice <alice@mailflow.test>\r\nTo: bob@remote.test\r\nSubject: clean one\r\n"
           b"Message-ID: <clean-1@t.test>\r\nDate: Fri, 27 Nov 2026 12:00:00 +0000\r\n\r\n"
           b"Hello Bob, nothing to see here.\r\n")
    code, doc, _ = s.submit(raw, ctype="message/rfc822")
    assert code == 202
    wait_for(lambda: settled(s, [doc["id"]]), 90, what="delivery")
    st = s.status(doc["id"])
    assert st["recipients"]["bob@remote.test"]["state"] == "delivered"
    assert "queued by scripted peer" in st["recipients"]["bob@remote.test"]["detail"]["reply"]
    assert {"scanned", "sent_folder", "delivered"} <= {e["state"] for e in st["timeline"]}
    got = [m for m in a.messages if b"<clean-1@t.test>" in m[2]]
    assert len(got) == 1 and got[0][2] == raw and got[0][0] == "alice@mailflow.test"
    wait_for(lambda: s.mailbox("alice@mailflow.test", "sent")["total"] >= 1, 30, what="Sent copy")
    assert doc["id"] in [m["id"] for m in s.mailbox("alice@mailflow.test", "sent")["messages"]]


def _with_attachment(name: str, data: bytes, subject: str) -> dict:
    return {"from": "mallory@mailflow.test", "to": "victim@remote.test", "subject": subject,
            "text": "see attached",
            "attachments": [{"filename": name, "content_type": "application/octet-stream",
                             "content_base64": base64.b64encode(data).decode()}]}


def test_virus_and_spam_are_quarantined(full_stack: Stack, peers):
    s, (a, b) = full_stack, peers
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("readme.txt", EICAR)
    ids = {}
    for kind, doc in [("eicar", _with_attachment("eicar.com", EICAR, "virus")),
                      ("zip", _with_attachment("eicar.zip", zipped.getvalue(), "zipped virus")),
                      ("gtube", {"from": "mallory@mailflow.test", "to": "victim@remote.test",
                                 "subject": "buy now", "text": f"Hello\n{GTUBE}\n"})]:
        code, resp, _ = s.submit(doc)
        assert code == 202
        ids[kind] = resp["id"]
    wait_for(lambda: settled(s, list(ids.values())), 90, what="verdicts")
    for kind, msg_id in ids.items():
        r = s.status(msg_id)["recipients"]["victim@remote.test"]
        assert r["state"] == "quarantined", (kind, r)
        if kind == "gtube":
            assert r["detail"]["verdict"] == "spam" and r["detail"]["action"] == "reject"
        else:
            assert r["detail"]["verdict"] == "virus"
            assert r["detail"]["signature"].startswith("Eicar-Test-Signature")
    delivered = a.message_ids() + b.message_ids()
    assert not any("mallory" in str(m) for m in delivered)
    assert all(b"mallory@" not in m[2] for m in a.messages + b.messages)
    assert s.mailbox("mallory@mailflow.test", "sent")["total"] == 0
    parked = [orjson.loads(v) for _, v in s.read_topic("errors")]
    assert {p["id"] for p in parked if p["state"] == "quarantined"} >= set(ids.values())


def test_per_recipient_results_at_one_domain(full_stack: Stack, peers):
    s, (a, _) = full_stack, peers
    code, doc, _ = s.submit({"from": "carol@mailflow.test", "to": ["ok1@split.test", "reject1@split.test"],
                             "subject": "split", "text": "x"})
    assert code == 202
    wait_for(lambda: settled(s, [doc["id"]]), 90, what="split delivery")
    st = s.status(doc["id"])["recipients"]
    assert st["ok1@split.test"]["state"] == "delivered"
    assert st["reject1@split.test"]["state"] == "bounced"
    assert st["reject1@split.test"]["detail"]["reply"].startswith("550")
    sent = [m for m in a.messages if m[1] == ["ok1@split.test"] and b"Subject: split" in m[2]]
    assert len(sent) == 1


def test_thousand_messages_to_twenty_domains_each_delivered_once(full_stack: Stack, peers):
    s, (a, b) = full_stack, peers
    before = Counter(a.message_ids() + b.message_ids())
    p = Producer(producer_config(s.env["MAILFLOW_KAFKA_BOOTSTRAP"]))
    ids = []
    for n in range(1000):
        dom = f"d{n % 20}.out.test"
        mid = f"<bulk{n}.{time.time_ns()}@t.test>"
        raw = (f"From: bulk{n % 17}@mailflow.test\r\nTo: user{n}@{dom}\r\nSubject: bulk {n}\r\n"
               f"Message-ID: {mid}\r\nDate: Fri, 27 Nov 2026 12:00:00 +0000\r\n\r\nbody {n}\r\n").encode()
        msg = Message(id=f"bulk{n:04d}{time.time_ns()}", sender=f"bulk{n % 17}@mailflow.test",
                      recipients=[f"user{n}@{dom}"], received_at=time.time(), size=len(raw), body=raw)
        p.produce(f"{s.prefix}submissions", key=msg.sender.encode(), value=msg.to_json())
        ids.append(mid)
    assert p.flush(30) == 0

    def arrived() -> int:
        got = Counter(a.message_ids() + b.message_ids()) - before
        return sum(1 for i in ids if got[i] >= 1)

    wait_for(lambda: arrived() == 1000, 300, interval=1, what="1000 deliveries")
    # A marker per domain, behind every copy of that domain's mail on `delivery`.
    s.wait_markers([(b if d < 10 else a, s.send_marker("bulk0@mailflow.test", f"d{d}.out.test"))
                    for d in range(20)])
    got = Counter(a.message_ids() + b.message_ids()) - before
    assert all(got[i] == 1 for i in ids), [i for i in ids if got[i] != 1][:5]
    # routing: d0..d9 went to peer b, d10..d19 to peer a
    b_ids = set(b.message_ids())
    for n, mid in enumerate(ids):
        assert (mid in b_ids) == (n % 20 < 10)


def test_raw_bytes_survive_to_the_peer_and_status_timeline(full_stack: Stack, peers):
    s, (a, _) = full_stack, peers
    raw = ("From: dora@mailflow.test\r\nTo: ünï@remote.test\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
           "Message-ID: <utf8-1@t.test>\r\nDate: Fri, 27 Nov 2026 12:00:00 +0000\r\n"
           "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
           "Content-Transfer-Encoding: 8bit\r\n\r\nçà et là\r\n").encode()
    code, doc, _ = s.submit(raw, ctype="message/rfc822")
    assert code == 202, doc
    wait_for(lambda: settled(s, [doc["id"]]), 90, what="utf-8 delivery")
    got = [m for m in a.messages if b"<utf8-1@t.test>" in m[2]]
    # (aiosmtpd's envelope does not keep a UTF-8 RCPT intact; the status does)
    assert len(got) == 1 and got[0][2] == raw and got[0][1][0].endswith("@remote.test")
    assert s.status(doc["id"])["recipients"]["ünï@remote.test"]["state"] == "delivered"
    code, body, _ = http("GET", f"{s.api}/v1/messages/{doc['id']}")
    assert code == 200 and [e["state"] for e in body["timeline"]][:2] == ["accepted", "validated"]
    assert re.match(r"^[0-9a-z]{26}$", doc["id"])
