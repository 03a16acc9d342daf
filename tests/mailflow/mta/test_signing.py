"""mailflow.mta.signing and mailflow.mta.domains, the pure parts: keys, records, headers, signatures.

Signatures are verified with dkimpy against the TXT value ``dns_records`` gives,
looked up in a dict here (the DNS path is in tests/pipeline/test_dkim.py)."""

from __future__ import annotations

import hashlib
import os
import re

import dkim
import pytest

from mailflow.config import Settings
from mailflow.mta import domains as dom
from mailflow.mta.signing import (
    _dkimpy_rsa_sign,
    _openssl_rsa_sign,
    from_domain,
    header_names,
    include_headers,
    sign_message,
    signed_body,
    signing_keys,
    wire_copies,
)
from mailflow.rules.unsubscribe import with_unsubscribe_headers

KEY = os.urandom(32)
MSG = (b"From: Alice <alice@Example.COM>\r\nTo: bob@remote.test\r\nSubject: hi\r\n"
       b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@example.com>\r\nX-Other: 1\r\n"
       b"\r\nhello\r\n.dot line\r\n")


@pytest.fixture(scope="module")
def rec() -> dict:
    return dom.new_domain(KEY, "example.com", ed25519=True)


def _dns(rec: dict) -> dict[bytes, bytes]:
    return {f"{r['name']}.".encode(): r["value"].encode()
            for r in dom.dns_records(rec, Settings()) if "_domainkey" in r["name"]}


def _verify(message: bytes, records: dict[bytes, bytes]) -> bool:
    return dkim.verify(message, dnsfunc=lambda name, timeout=5: records.get(name))


def _sign(rec: dict, message: bytes) -> bytes:
    keys = [(s["selector"], s["algorithm"], dom.private_key(KEY, rec, s)) for s in signing_keys(rec, set())]
    return sign_message(message, "example.com", keys)


def test_new_domain_selectors_and_sealed_keys(rec: dict) -> None:
    rsa, ed = rec["selectors"]
    assert rsa["algorithm"] == dom.RSA and ed["algorithm"] == dom.ED25519
    assert rsa["selector"].startswith("mf20") and ed["selector"] == rsa["selector"] + "e"
    assert {s["state"] for s in rec["selectors"]} == {"active"}
    private = dom.private_key(KEY, rec, rsa)
    assert private.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert private not in str(rec).encode() and b"PRIVATE" not in str(rec).encode()
    view = dom.public_view(rec, Settings())
    assert all("private" not in s for s in view["selectors"]) and view["dns"]


def test_selector_names_dated_and_unique() -> None:
    assert dom.new_selector(set(), dom.RSA, 1764583200) == "mf20251201"
    assert dom.new_selector({"mf20251201"}, dom.RSA, 1764583200) == "mf20251201-2"
    assert dom.new_selector({"mf20251201", "mf20251201-2"}, dom.RSA, 1764583200) == "mf20251201-3"


def test_normalize_domain() -> None:
    assert dom.normalize_domain("Example.COM.") == "example.com"
    for bad in ("localhost", "not a domain", ""):
        with pytest.raises(dom.DomainError):
            dom.normalize_domain(bad)


def test_dns_records_and_zone_lines(rec: dict) -> None:
    records = dom.dns_records(rec, Settings(ehlo_name="mta.example.com"))
    names = [r["name"] for r in records]
    assert names == [f"{rec['selectors'][0]['selector']}._domainkey.example.com",
                     f"{rec['selectors'][1]['selector']}._domainkey.example.com", "example.com",
                     "_dmarc.example.com"]
    assert records[0]["value"].startswith("v=DKIM1; k=rsa; p=MIIBIjAN")
    assert records[1]["value"].startswith("v=DKIM1; k=ed25519; p=")
    assert records[2]["value"] == "v=spf1 a:mta.example.com ~all"
    assert records[3]["value"].startswith("v=DMARC1; p=none;")
    line = dom.zone_lines(records)[0]
    assert line.startswith(f"{names[0]}.\t3600\tIN\tTXT\t\"v=DKIM1; k=rsa; p=")
    strings = line.split("\t")[-1]
    assert all(len(p) <= 257 for p in strings.split('" "'))  # 255 + quotes
    assert strings.replace('" "', "").strip('"') == records[0]["value"]
    assert dom.parse_tags('v=DKIM1; k=rsa; p=AB CD') == {"v": "DKIM1", "k": "rsa", "p": "ABCD"}


def test_headers_signed_and_from_oversigned() -> None:
    names = header_names(MSG)
    assert names == ["From", "To", "Subject", "Date", "Message-ID", "X-Other"]
    assert include_headers(names) == [b"from", b"to", b"subject", b"date", b"message-id", b"from"]
    assert include_headers(["To", "To", "Feedback-ID"]) == [b"to", b"to", b"feedback-id"]


def test_from_domain() -> None:
    assert from_domain(MSG) == "example.com"
    assert from_domain(b"To: x@y.test\r\n\r\nno from\r\n") is None
    assert from_domain(b"From: not an address\r\n\r\n") is None
    assert from_domain(b'From: "Doe, John" <j@Ex.COM>\r\n\r\n') == "ex.com"
    assert from_domain(b"from:j@a.test (comment)\r\n\r\n") == "a.test"
    assert from_domain(b"From: folded\r\n  <k@c.test>\r\n\r\n") == "c.test"
    assert from_domain(b"X-From: x@y.test\r\n\r\n") is None
    assert from_domain(b"Subject: x\r\n\r\nFrom: in-the-body@d.test\r\n") is None


def test_signature_verifies_both_algorithms_and_fails_on_one_changed_byte(rec: dict) -> None:
    header = _sign(rec, MSG)
    assert header.count(b"DKIM-Signature:") == 2
    assert b"c=relaxed/relaxed" in header and b"d=example.com" in header
    assert b"h=from : to : subject : date : message-id : from" in header.replace(b"\r\n", b"")
    signed = header + MSG
    records = _dns(rec)
    assert _verify(signed, records)
    d = dkim.DKIM(signed)
    assert d.verify(idx=0, dnsfunc=lambda n, timeout=5: records.get(n))
    assert d.verify(idx=1, dnsfunc=lambda n, timeout=5: records.get(n))
    assert not _verify(signed.replace(b"hello", b"hellp"), records)
    # oversigned From: a second From added on the way breaks the signature
    assert not _verify(header + b"From: eve@evil.test\r\n" + MSG, records)


def test_lf_message_signed_as_it_goes_on_the_wire(rec: dict) -> None:
    lf = MSG.replace(b"\r\n", b"\n")
    wire = (_sign(rec, lf) + lf).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert _verify(wire, _dns(rec))


def test_openssl_rsa_signature_is_dkimpys(rec: dict) -> None:
    pk = dkim.crypto.parse_pem_private_key(dom.private_key(KEY, rec, rec["selectors"][0]))

    class H:  # dkimpy's HashThrough interface
        name = "sha256"

        def digest(self) -> bytes:
            return hashlib.sha256(b"data").digest()

    assert _openssl_rsa_sign(H(), pk) == _dkimpy_rsa_sign(H(), pk)


def test_rotation_pending_then_promoted(rec: dict) -> None:
    rot = dom.rotated(KEY, rec)
    pending = [s for s in rot["selectors"] if s["state"] == "pending"]
    assert sorted(s["algorithm"] for s in pending) == sorted([dom.ED25519, dom.RSA])
    old_rsa = rec["selectors"][0]["selector"]
    new_rsa = next(s["selector"] for s in pending if s["algorithm"] == dom.RSA)
    assert new_rsa != old_rsa
    # pending signs only once published
    assert [s["selector"] for s in signing_keys(rot, set()) if s["algorithm"] == dom.RSA] == [old_rsa]
    assert [s["selector"] for s in signing_keys(rot, {new_rsa}) if s["algorithm"] == dom.RSA] == [new_rsa]
    done = dom.promoted(rot, new_rsa)
    states = {s["selector"]: s["state"] for s in done["selectors"]}
    assert states[new_rsa] == "active" and states[old_rsa] == "retired"
    assert [s["selector"] for s in signing_keys(done, set()) if s["algorithm"] == dom.RSA] == [new_rsa]
    # mail signed with either verifies while both records are published
    records = _dns(done)
    assert _verify(_sign(rec, MSG) + MSG, records) and _verify(_sign(done, MSG) + MSG, records)


def test_signed_body() -> None:
    assert signed_body({"dkim": "DKIM-Signature: a\r\n"}, b"X: 1\r\n\r\nb") == b"DKIM-Signature: a\r\nX: 1\r\n\r\nb"
    assert signed_body({}, b"raw") == b"raw"


def test_one_click_copies_are_signed_over_their_own_unsubscribe_headers(rec: dict) -> None:
    links = {"bob@remote.test": "<https://mf.test/v1/unsubscribe/T1>, <mailto:u@mf.test>"}
    signed = _sign(rec, with_unsubscribe_headers(MSG, links["bob@remote.test"]))
    meta = {"dkim": _sign(rec, MSG).decode(), "unsubscribe": links,
            "dkim_rcpt": {"bob@remote.test": signed.decode()}}
    copies = wire_copies(meta, MSG, ["bob@remote.test", "eve@remote.test"])
    assert [rs for rs, _ in copies] == [["bob@remote.test"], ["eve@remote.test"]]
    bob, eve = copies[0][1], copies[1][1]
    records = _dns(rec)
    assert bob.startswith(signed + b"List-Unsubscribe: <https://mf.test/v1/unsubscribe/T1>")
    h_tags = re.findall(rb"\bh=([^;]+);", re.sub(rb"\s+", b"", bob.split(b"\r\n\r\n")[0]))
    assert h_tags and all(tag.startswith(b"list-unsubscribe:list-unsubscribe-post:") for tag in h_tags)
    assert _verify(bob, records) and _verify(eve, records)
    assert b"List-Unsubscribe" not in eve  # no link: the whole message's signature
    # Another recipient's link under this signature does not verify.
    assert not _verify(bob.replace(b"/T1>", b"/T2>"), records)
    # Without links: one transaction for all, as before.
    assert wire_copies({"dkim": "DKIM-Signature: a\r\n"}, b"X: 1\r\n\r\nb", ["a@x", "b@x"]) == [
        (["a@x", "b@x"], b"DKIM-Signature: a\r\nX: 1\r\n\r\nb")]
