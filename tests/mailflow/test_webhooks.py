"""Webhook signatures, secrets at rest, where webhooks may go, and what they carry."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from agents.webhooks import Circuits
from mailflow.config import Settings
from mailflow.webhooks import (
    address_allowed,
    check_url,
    event_id,
    matches,
    payload,
    resolve_allowed,
    seal,
    sign,
    unseal,
    verify,
)
from schemas.records import Event


def test_signature_is_hmac_of_t_dot_body() -> None:
    body = b'{"event_id":"ev_1"}'
    header = sign("whsec_x", body, t=1700000000)
    t, v1 = (p.split("=", 1)[1] for p in header.split(","))
    assert t == "1700000000"
    assert v1 == hmac.new(b"whsec_x", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert verify("whsec_x", body, header, now=1700000010)
    assert not verify("whsec_y", body, header, now=1700000010)
    assert not verify("whsec_x", body + b" ", header, now=1700000010)
    assert not verify("whsec_x", body, header, now=1700009999)  # too old: a replay
    assert not verify("whsec_x", body, "garbage")


def test_secret_sealed_not_in_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILFLOW_WEBHOOK_KEY", raising=False)
    s = Settings(data_dir=tmp_path)
    sealed = seal(s, "wh_1", "whsec_topsecret")
    assert "topsecret" not in sealed and sealed != seal(s, "wh_1", "whsec_topsecret")  # random nonce
    assert unseal(s, "wh_1", sealed) == "whsec_topsecret"
    with pytest.raises(Exception):  # noqa: B017 - bound to another webhook id
        unseal(s, "wh_2", sealed)
    monkeypatch.setenv("MAILFLOW_WEBHOOK_KEY", "another key")
    with pytest.raises(Exception):  # noqa: B017 - another key
        unseal(s, "wh_1", sealed)


@pytest.mark.parametrize("ip,public", [
    ("93.184.216.34", True), ("2606:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("::1", False),
    ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False), ("224.0.0.1", False),
])
def test_address_rules(ip: str, public: bool) -> None:
    assert address_allowed(ip) is public
    if ip not in ("0.0.0.0", "224.0.0.1"):
        assert address_allowed(ip, private_ok=True)


def test_urls() -> None:
    assert check_url("https://hooks.example/x?y=1") == ("hooks.example", 443)
    assert check_url("http://hooks.example:8080/") == ("hooks.example", 8080)
    for bad in ("ftp://x.example/", "https:///nohost", "https://u:p@x.example/", "not a url", 3, "",
                "https://x.example/" + "a" * 3000):
        assert isinstance(check_url(bad), str), bad
    assert "private" in (resolve_allowed("127.0.0.1", 80, False) or "")
    assert "private" in (resolve_allowed("localhost", 80, False) or "")
    assert resolve_allowed("127.0.0.1", 80, True) is None
    assert "resolve" in (resolve_allowed("nonexistent.invalid", 80, False) or "")


def test_event_ids_stable() -> None:
    assert event_id("m1", "a@x.test", "delivered", 1.0) == event_id("m1", "a@x.test", "delivered", 2.0)
    assert event_id("m1", "a@x.test", "deferred", 1.0) != event_id("m1", "a@x.test", "deferred", 2.0)
    assert event_id("m1", "a@x.test", "delivered", 1.0) != event_id("m1", "b@x.test", "delivered", 1.0)
    ev = Event(id="m1", state="bounced", stage="deliver", ts=5.0, recipients=["a@x.test"],
               detail={"reply": "550 5.1.1 no", "class": "hard"})
    p = payload(ev, "a@x.test", "s@shop.test")
    assert (p["message_id"], p["recipient"], p["state"], p["reply"], p["class"], p["time"]) == (
        "m1", "a@x.test", "bounced", "550 5.1.1 no", "hard", 5.0)


def test_matching_by_state_scope_and_age() -> None:
    hook = {"owner": "k1", "events": ["delivered"], "created_at": 100.0,
            "scope": {"kind": "key", "domains": ["shop.test"], "address": ""}}
    assert matches(hook, "delivered", "news@shop.test", 200.0)
    assert not matches(hook, "bounced", "news@shop.test", 200.0)
    assert not matches(hook, "delivered", "x@other.test", 200.0)
    assert not matches(hook, "delivered", "news@shop.test", 50.0)  # before it existed
    admin = {**hook, "events": ["*"], "scope": {"kind": "key", "domains": ["*"]}}
    assert matches(admin, "suppressed", "x@other.test", 200.0)
    token = {**hook, "scope": {"kind": "token", "domains": [], "address": "me@shop.test"}}
    assert matches(token, "delivered", "me@shop.test", 200.0)
    assert not matches(token, "delivered", "news@shop.test", 200.0)


def test_circuit_doubles_and_closes() -> None:
    c = Circuits()
    assert not c.is_open("h", 0.0)
    c.failed("h", 0.0)
    assert c.is_open("h", 0.5) and not c.is_open("h", 1.1)
    c.failed("h", 2.0)
    assert c.is_open("h", 3.9) and not c.is_open("h", 4.1)
    for _ in range(20):
        c.failed("h", 10.0)
    assert c.is_open("h", 69.0) and not c.is_open("h", 70.1)
    c.succeeded("h")
    assert not c.is_open("h", 10.0)
    assert not c.is_open("other", 10.0)
