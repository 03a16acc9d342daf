"""Verified TLS to MX hosts through the whole pipeline: the real broker and stages,
MX records served by a dnsmasq of the test's own, a real aiosmtpd peer offering
STARTTLS with a certificate from a CA made in the test (``MAILFLOW_TLS_CA_FILE``).

``MAILFLOW_SMTP_TLS=required``: mail for good.test (MX mx.good.test, which the
certificate names) is delivered and its status says the TLS was verified; mail for
bad.test (MX mx.bad.test, the same peer, so a certificate naming another host) is
deferred with the reason and never reaches the peer. MTA-STS: sts.test publishes an
``enforce`` policy (served over HTTPS by a local server with a test-CA certificate,
``MAILFLOW_MTA_STS_PORT``) naming only its second MX; its first MX, a peer on
127.0.0.2 with a valid certificate, is never contacted.

The stack also runs ``MAILFLOW_DKIM=required`` (mailflow.test has a key): a message
from a domain without one, produced straight to ``submissions`` past the API's
check, is parked by the sent-folder stage as ``dkim_key_missing``, never sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from harness import Stack, settled, wait_for
from testca import LocalDns, PolicyServer, TestCA, TlsPeer, run_cli, txt_record

RECORDS = """\
mx-host=good.test,mx.good.test,10
host-record=mx.good.test,127.0.0.1
mx-host=bad.test,mx.bad.test,10
host-record=mx.bad.test,127.0.0.1
mx-host=sts.test,mx.other.sts.test,10
mx-host=sts.test,mx.sts.test,20
host-record=mx.other.sts.test,127.0.0.2
host-record=mx.sts.test,127.0.0.1
host-record=mta-sts.sts.test,127.0.0.1
""" + txt_record("_mta-sts.sts.test", "v=STSv1; id=20261201;") + "\n"
POLICY = "version: STSv1\nmode: enforce\nmx: mx.sts.test\nmax_age: 86400\n"


@pytest.fixture(scope="module")
def tls_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, ...]]:
    base = tmp_path_factory.mktemp("tls")
    ca = TestCA(base / "ca")
    peer = TlsPeer(ca.server_context(["mx.good.test", "mx.sts.test"])).start()
    # the MX the policy does not name: same port, another loopback address
    other = TlsPeer(ca.server_context(["mx.other.sts.test"]), host="127.0.0.2", port=peer.port).start()
    policy = PolicyServer(ca.server_context(["mta-sts.sts.test"]), POLICY).start()
    dns = LocalDns(base / "dns", RECORDS).start()
    try:
        yield ca, peer, dns, other, policy
    finally:
        dns.stop()
        policy.stop()
        other.stop()
        peer.stop()


@pytest.fixture(scope="module")
def tls_stack(kafka: str, work_dir: Path, tls_world) -> Iterator[Stack]:
    ca, peer, dns, _, policy = tls_world
    stack = Stack(work_dir, kafka, smtp_routes="", smtp_tls="required", tls_ca_file=str(ca.ca_file), dns=dns.nameserver,
                  mx_port=str(peer.port), mta_sts_port=str(policy.port), scanners="none", retry_schedule="1h",
                  max_queue_age="1d", dkim="required")
    try:
        out = run_cli(stack, "domains", "add", "mailflow.test")
        assert out.returncode == 0, out.stderr
        yield stack.start(["ratelimit", "validate", "scan", "sentfolder", "deliver", "status"])
    finally:
        stack.stop()


def test_required_tls_verifies_the_mx_name(tls_stack: Stack, tls_world) -> None:
    s, peer = tls_stack, tls_world[1]
    code, good, _ = s.submit({"from": "alice@mailflow.test", "to": "bob@good.test", "subject": "tls ok",
                              "text": "over verified TLS"})
    assert code == 202
    code, bad, _ = s.submit({"from": "alice@mailflow.test", "to": "bob@bad.test", "subject": "tls bad",
                             "text": "never in clear"})
    assert code == 202
    wait_for(lambda: settled(s, [good["id"]]), 90, what="delivery over TLS")
    rcpt = s.status(good["id"])["recipients"]["bob@good.test"]
    assert rcpt["state"] == "delivered"
    tls = rcpt["detail"]["tls"]
    assert tls["verified"] is True and tls["policy"] == "required" and tls["version"].startswith("TLSv1.")
    assert peer.tls_flags and all(peer.tls_flags)

    def deferred() -> dict | None:
        st = s.status(bad["id"])
        return next((e for e in st["timeline"] if e["state"] == "deferred"), None) if st else None

    ev = wait_for(deferred, 90, what="the deferral")
    assert "4.7.5 TLS certificate of mx.bad.test not verified: wrong host name" in ev["detail"]["error"]
    assert ev["detail"]["tls"]["verified"] is False
    assert not [m for m in peer.messages if b"never in clear" in m[2]]


def test_mta_sts_enforce_never_contacts_an_mx_the_policy_does_not_name(tls_stack: Stack, tls_world) -> None:
    s, peer, other = tls_stack, tls_world[1], tls_world[3]
    code, doc, _ = s.submit({"from": "alice@mailflow.test", "to": "bob@sts.test", "subject": "sts",
                             "text": "policy says mx.sts.test"})
    assert code == 202
    wait_for(lambda: settled(s, [doc["id"]]), 90, what="delivery under MTA-STS")
    rcpt = s.status(doc["id"])["recipients"]["bob@sts.test"]
    assert rcpt["state"] == "delivered", rcpt
    assert rcpt["detail"]["tls"]["mta_sts"] == "enforce" and rcpt["detail"]["tls"]["verified"] is True
    assert [m for m in peer.messages if b"policy says mx.sts.test" in m[2]]
    assert other.connections == 0 and not other.messages


def test_dkim_required_parks_mail_from_a_domain_without_key(tls_stack: Stack, tls_world) -> None:
    import time

    from confluent_kafka import Producer

    from mailflow.ids import new_id
    from schemas.records import Message

    s, peer = tls_stack, tls_world[1]
    raw = (b"From: x@nokey.test\r\nTo: bob@good.test\r\nSubject: unsigned\r\n"
           b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <nokey-1@nokey.test>\r\n\r\nno key\r\n")
    msg = Message(id=new_id(), sender="x@nokey.test", recipients=["bob@good.test"],
                  received_at=time.time(), size=len(raw), body=raw, source="kafka")
    p = Producer({"bootstrap.servers": s.env["MAILFLOW_KAFKA_BOOTSTRAP"], "acks": "all"})
    p.produce(f"{s.prefix}submissions", key=msg.sender.encode(), value=msg.to_json())
    assert p.flush(10) == 0
    wait_for(lambda: settled(s, [msg.id]), 90, what="the refusal")
    rcpt = s.status(msg.id)["recipients"]["bob@good.test"]
    assert rcpt["state"] == "rejected" and rcpt["detail"]["reason"] == "dkim_key_missing", rcpt
    errors = [orjson.loads(v) for _, v in s.read_topic("errors")]
    assert [e for e in errors if e.get("id") == msg.id and e["reason"] == "dkim_key_missing"]
    assert not [m for m in peer.messages if b"<nokey-1@nokey.test>" in m[2]]
