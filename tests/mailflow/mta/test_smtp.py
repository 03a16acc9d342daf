"""mailflow.mta.smtp's TLS: real aiosmtpd peers offering STARTTLS with certificates from a
CA made in the test; the MX name is given as ``server_name`` while the connection
goes to 127.0.0.1, as the delivery stage does after resolving the MX host."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from testca import TestCA, TlsPeer

from mailflow.mta.smtp import Pool, tls_summary, verify_failure
from mailflow.rules.delivery import DELIVERED, TEMPORARY

MSG = b"From: a@mailflow.test\r\nTo: b@good.test\r\nSubject: t\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def good(ca: TestCA) -> Iterator[TlsPeer]:
    peer = TlsPeer(ca.server_context(["mx.good.test"])).start()
    yield peer
    peer.stop()


async def _send(peer: TlsPeer, name: str, tls: str, ca_file: Path | str = "") -> list:
    pool = Pool(ehlo="mailflow.test", timeout=5, tls=tls, ca_file=str(ca_file))
    try:
        return await pool.send("127.0.0.1", peer.port, "a@mailflow.test", ["b@good.test"], MSG,
                               server_name=name)
    finally:
        await pool.close()


async def test_required_verifies_the_mx_name_not_the_address(ca: TestCA, good: TlsPeer) -> None:
    before = len(good.messages)
    [o] = await _send(good, "mx.good.test", "required", ca.ca_file)
    assert o.kind == DELIVERED, o.reply
    assert o.tls["verified"] is True and o.tls["policy"] == "required"
    assert o.tls["version"] in ("TLSv1.2", "TLSv1.3") and o.tls["cipher"]
    assert len(good.messages) == before + 1 and good.tls_flags[-1] is True


async def test_required_wrong_name_defers_and_says_so(ca: TestCA, good: TlsPeer) -> None:
    before = len(good.messages)
    [o] = await _send(good, "mx.other.test", "required", ca.ca_file)
    assert o.kind == TEMPORARY and o.code is None
    assert o.reply.startswith("4.7.5 TLS certificate of mx.other.test not verified: wrong host name"), o.reply
    assert o.tls == {"policy": "required", "version": None, "verified": False, "reason": o.reply}
    assert len(good.messages) == before  # nothing went over the unverified connection


async def test_required_unknown_ca_without_the_ca_file(good: TlsPeer) -> None:
    [o] = await _send(good, "mx.good.test", "required")
    assert o.kind == TEMPORARY and "unknown CA" in o.reply, o.reply


async def test_required_expired_certificate(ca: TestCA) -> None:
    peer = TlsPeer(ca.server_context(["mx.old.test"], expired=True)).start()
    try:
        [o] = await _send(peer, "mx.old.test", "required", ca.ca_file)
    finally:
        peer.stop()
    assert o.kind == TEMPORARY and "certificate expired" in o.reply, o.reply
    assert not peer.messages


async def test_required_without_starttls_defers() -> None:
    peer = TlsPeer(None).start()
    try:
        [o] = await _send(peer, "mx.plain.test", "required")
    finally:
        peer.stop()
    assert o.kind == TEMPORARY and "STARTTLS required by policy but not offered by mx.plain.test" in o.reply
    assert not peer.messages


async def test_opportunistic_encrypts_and_records_whether_it_verified(ca: TestCA, good: TlsPeer) -> None:
    [ok] = await _send(good, "mx.good.test", "opportunistic", ca.ca_file)
    assert ok.kind == DELIVERED and ok.tls["verified"] is True and ok.tls["policy"] == "opportunistic"
    pool = Pool(ehlo="mailflow.test", timeout=5, tls="opportunistic", ca_file=str(ca.ca_file))
    try:
        for _ in range(2):  # the second connection skips the verified try, same answer
            [o] = await pool.send("127.0.0.1", good.port, "a@mailflow.test", ["b@good.test"], MSG,
                                  server_name="mx.wrong.test")
            assert o.kind == DELIVERED, o.reply
            assert o.tls["verified"] is False and o.tls["version"] and "wrong host name" in o.tls["reason"]
            assert good.tls_flags[-1] is True  # encrypted all the same
            await pool.close()
    finally:
        await pool.close()


async def test_off_sends_in_clear(good: TlsPeer) -> None:
    [o] = await _send(good, "mx.good.test", "off")
    assert o.kind == DELIVERED and o.tls == {"policy": "off", "version": None, "verified": False}
    assert good.tls_flags[-1] is False


def test_pool_refuses_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="TLS policy"):
        Pool(ehlo="x", tls="sometimes")


def test_verify_failure_words() -> None:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_code, exc.verify_message = 10, "certificate has expired"
    assert verify_failure(exc, "mx.a.test") == (
        "4.7.5 TLS certificate of mx.a.test not verified: certificate expired (certificate has expired)")
    exc.verify_code = 999
    assert "verification failed" in verify_failure(exc, "mx.a.test")
    assert "TLS handshake failed" in verify_failure(ssl.SSLError(1, "wrong version"), "mx.a.test")


def test_tls_summary_without_tls_and_with_mta_sts() -> None:
    assert tls_summary("opportunistic", None, True) == {"policy": "opportunistic", "version": None,
                                                        "verified": False}
    assert tls_summary("required", None, False, "why", "enforce")["mta_sts"] == "enforce"
