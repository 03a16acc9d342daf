"""Verified TLS to MX hosts through the whole pipeline: the real broker and stages,
MX records served by a dnsmasq of the test's own, a real aiosmtpd peer offering
STARTTLS with a certificate from a CA made in the test (``MAILFLOW_TLS_CA_FILE``).

``MAILFLOW_SMTP_TLS=required``: mail for good.test (MX mx.good.test, which the
certificate names) is delivered and its status says the TLS was verified; mail for
bad.test (MX mx.bad.test, the same peer, so a certificate naming another host) is
deferred with the reason and never reaches the peer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Stack, settled, wait_for
from testca import LocalDns, TestCA, TlsPeer

RECORDS = """\
mx-host=good.test,mx.good.test,10
host-record=mx.good.test,127.0.0.1
mx-host=bad.test,mx.bad.test,10
host-record=mx.bad.test,127.0.0.1
"""


@pytest.fixture(scope="module")
def tls_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestCA, TlsPeer, LocalDns]]:
    base = tmp_path_factory.mktemp("tls")
    ca = TestCA(base / "ca")
    peer = TlsPeer(ca.server_context(["mx.good.test"])).start()
    dns = LocalDns(base / "dns", RECORDS).start()
    try:
        yield ca, peer, dns
    finally:
        dns.stop()
        peer.stop()


@pytest.fixture(scope="module")
def tls_stack(kafka: str, work_dir: Path, tls_world) -> Iterator[Stack]:
    ca, peer, dns = tls_world
    stack = Stack(work_dir, kafka, smtp_tls="required", tls_ca_file=str(ca.ca_file), dns=dns.nameserver,
                  mx_port=str(peer.port), scanners="none", retry_schedule="1h", max_queue_age="1d")
    try:
        yield stack.start(["ratelimit", "validate", "scan", "sentfolder", "deliver", "status"])
    finally:
        stack.stop()


def test_required_tls_verifies_the_mx_name(tls_stack: Stack, tls_world) -> None:
    s, (_, peer, _) = tls_stack, tls_world
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
