"""Access control and idempotency: unit tests, then the real API on the real broker.

The real-API tests share the session's submission stack (ratelimit, validate,
store, status) from tests/conftest.py; each test uses its own domains and senders.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import os
import re
import threading
import uuid
from pathlib import Path

import orjson
import pytest
from harness import Stack, http, wait_for

from mailflow.api import auth
from mailflow.api.auth import ANONYMOUS, Principal, domain_allowed, parse_credential
from mailflow.api.server import derive_id
from mailflow.ids import is_id

ROOT = Path(__file__).resolve().parents[2]


# ---- unit ------------------------------------------------------------------------------
def test_credential_format_and_parsing() -> None:
    assert parse_credential("mf_0123456789ab_" + "x" * 43) == ("key", "0123456789ab", "x" * 43)
    assert parse_credential("mft_0123456789ab_" + "y_-z" * 11)[0] == "token"
    for bad in ("", "mf_", "mf_0123456789ab", "mf_XYZ_" + "x" * 43, "mf_0123456789ab_short",
                "xx_0123456789ab_" + "x" * 43, "Bearer mf_0123456789ab_" + "x" * 43):
        assert parse_credential(bad) is None, bad


def test_domain_rules() -> None:
    assert domain_allowed(["a.test"], "x@a.test") and domain_allowed(["a.test"], "x@A.TEST")
    assert not domain_allowed(["a.test"], "x@sub.a.test") and not domain_allowed(["a.test"], "x@b.test")
    assert domain_allowed(["*.a.test"], "x@sub.a.test") and not domain_allowed(["*.a.test"], "x@evila.test")
    assert domain_allowed(["*"], "anyone@anywhere.test")
    assert not domain_allowed(["a.test"], "") and not domain_allowed(["a.test"], "a.test")
    with pytest.raises(ValueError):
        auth.normalize_domains(["bad domain"])
    with pytest.raises(ValueError):
        auth.normalize_domains([" "])
    assert auth.normalize_domains(["B.test", "a.test", "a.test"]) == ["a.test", "b.test"]


def test_principal_permissions() -> None:
    key = Principal(id="k", kind="key", domains=("a.test",))
    tok = Principal(id="t", kind="token", address="me@a.test")
    admin = Principal(id="adm", kind="key", domains=("*",))
    assert key.may_send_as("anyone@a.test") and not key.may_send_as("x@b.test")
    assert tok.may_send_as("me@a.test") and not tok.may_send_as("you@a.test")
    assert tok.may_read_mailbox("me@a.test") and not tok.may_read_mailbox("you@a.test")
    assert not key.may_read_mailbox("me@a.test")  # only admin keys read mailboxes
    assert key.may_read_status("x@a.test") and not key.may_read_status("x@b.test")
    assert tok.may_read_status("me@a.test") and not tok.may_read_status("you@a.test")
    # The token's mailbox is one whatever the case of its local part (mailbox_key).
    assert tok.may_send_as("Me@A.test") and tok.may_read_status("ME@a.test")
    assert not tok.may_send_as("me@b.test") and not tok.may_send_as("me2@a.test")
    assert not tok.may_send_as("not an address") and not tok.may_read_status("")
    assert not key.may_read_status(None) and admin.may_read_status(None)
    assert admin.admin and ANONYMOUS.admin and not key.admin and not tok.admin


def test_only_a_hash_is_stored_and_comparison_is_constant_time() -> None:
    secret = "s" * 43
    h = auth.hash_secret(secret)
    assert h.startswith("sha256:") and secret not in h
    src = (ROOT / "mailflow/api/auth.py").read_text()
    assert "hmac.compare_digest" in src


def test_auth_mode_setting(monkeypatch) -> None:
    monkeypatch.delenv("MAILFLOW_AUTH", raising=False)
    assert auth.auth_mode() == "required"
    monkeypatch.setenv("MAILFLOW_AUTH", "off")
    assert auth.auth_mode() == "off"
    monkeypatch.setenv("MAILFLOW_AUTH", "maybe")
    with pytest.raises(ValueError):
        auth.auth_mode()


def test_derived_ids_are_valid_and_stable() -> None:
    a = derive_id("cred:k", "hash1", "")
    assert is_id(a) and a == derive_id("cred:k", "hash1", "")
    assert a != derive_id("cred:k", "hash2", "") and a != derive_id("cred:k", "hash1", a)


def test_webmail_renders_html_in_an_inert_sandbox() -> None:
    js = (ROOT / "mailflow/web/app.js").read_text()
    sandbox = re.search(r"sandbox: '([^']*)'", js).group(1)
    assert "allow-scripts" not in sandbox and "allow-same-origin" not in sandbox
    assert "frame.srcdoc = " in js and "html_safe" in js
    assert ".innerHTML" not in js  # untrusted text only through textContent


async def test_shared_query_answers_each_caller_from_a_query_started_after_it() -> None:
    """Callers that arrive while a query runs share the next one, never the running one."""
    started: list[int] = []  # the value each query will return, in start order
    release = threading.Event()

    def query() -> int:
        n = len(started)
        started.append(n)
        release.wait(5)
        return n

    shared = auth._SharedQuery(query)
    first = asyncio.create_task(shared.get())
    await asyncio.sleep(0.05)  # query 0 is running
    late = [asyncio.create_task(shared.get()) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert started == [0]  # the late callers wait for the next query, not a query each
    release.set()
    assert await first == 0
    assert await asyncio.gather(*late) == [1] * 5
    assert started == [0, 1]  # six callers, two queries


async def test_shared_query_hands_a_failure_to_its_callers_and_recovers() -> None:
    calls = []

    def query() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("broker away")
        return 7

    shared = auth._SharedQuery(query)
    with pytest.raises(RuntimeError):
        await shared.get()
    assert await shared.get() == 7


# ---- the real API ----------------------------------------------------------------------
def submissions_with(stack: Stack, marker: str) -> list[dict]:
    """The records on `submissions` whose message (inline, base64) contains `marker`."""
    out = []
    for _, v in stack.read_topic("submissions", timeout=5):
        try:
            rec = orjson.loads(v)
            body = base64.b64decode(rec.get("body") or "")
        except (orjson.JSONDecodeError, ValueError, AttributeError):
            continue
        if marker.encode() in body:
            out.append(rec)
    return out


def topic_has(stack: Stack, topic: str, marker: str) -> bool:
    assert topic == "submissions"
    return bool(submissions_with(stack, marker))


def raw_bytes(stack: Stack, address: str, msg_id: str) -> bytes:
    code, body, _ = http("GET", f"{stack.api}/v1/mailboxes/{address}/messages/{msg_id}/raw")
    assert code == 200, body
    return body


@pytest.fixture(scope="module")
def s(submission_stack: Stack) -> Stack:
    return submission_stack


@pytest.fixture(scope="module")
def creds(s: Stack) -> dict[str, str]:
    settings = s.settings()
    return {
        "a": auth.create_key(settings, ["a.test"], name="svc-a")[0],
        "b": auth.create_key(settings, ["b.test"], name="svc-b")[0],
        "alice": auth.create_token(settings, "alice@mailflow.test")[0],
        "bob": auth.create_token(settings, "bob@mailflow.test")[0],
    }


def test_no_credential_is_401_with_a_challenge(s: Stack) -> None:
    marker = f"m-{uuid.uuid4().hex}"
    doc = {"from": "x@a.test", "to": "y@remote.test", "subject": marker, "text": "x"}
    code, body, hdrs = s.submit(doc, auth=None)
    assert code == 401 and body["error"]["code"] == "unauthorized"
    assert hdrs["WWW-Authenticate"].startswith("Bearer")
    for bad in ("Basic dXNlcjpwYXNz", "Bearer nonsense", "Bearer mf_0123456789ab_" + "x" * 43):
        code, body, hdrs = s.submit(doc, headers={"Authorization": bad})
        assert code == 401 and "invalid_token" in hdrs["WWW-Authenticate"], bad
    for path in ("/v1/messages/01abc", "/v1/mailboxes/alice@mailflow.test/messages", "/v1/whoami"):
        assert http("GET", s.api + path, auth=None)[0] == 401
    assert not topic_has(s, "submissions", marker)


def test_key_sends_only_within_its_domains(s: Stack, creds) -> None:
    marker = f"m-{uuid.uuid4().hex}"
    code, body, _ = s.submit({"from": "svc@b.test", "to": "y@remote.test", "subject": marker, "text": "x"},
                             auth=creds["a"])
    assert code == 403 and body["error"]["code"] == "forbidden" and "from" in body["error"]["fields"]
    # A display name of its own is fine; the address decides.
    code, body, _ = s.submit({"from": "Anything Goes <svc@a.test>", "to": "y@remote.test",
                              "subject": marker + "-ok", "text": "ok"}, auth=creds["a"])
    assert code == 202, body
    assert [r["id"] for r in submissions_with(s, marker)] == [body["id"]]  # the check sees what got in


def test_forged_from_in_a_raw_message_is_403(s: Stack, creds) -> None:
    marker = f"m-{uuid.uuid4().hex}"
    forged = (f"From: The Boss <boss@b.test>\r\nTo: y@remote.test\r\nSubject: {marker}\r\n\r\npay me\r\n").encode()
    # envelope sender inside the key's domains, header From outside: refused
    code, body, _ = http("POST", f"{s.api}/v1/messages?from=ok@a.test", forged,
                         ctype="message/rfc822", auth=creds["a"])
    assert code == 403, body
    # a second From address smuggled into the header
    two = (f"From: ok@a.test, boss@b.test\r\nTo: y@remote.test\r\nSubject: {marker}\r\n\r\nx\r\n").encode()
    assert s.submit(two, ctype="message/rfc822", auth=creds["a"])[0] == 403
    # a Sender: header naming someone else
    snd = (f"From: ok@a.test\r\nSender: boss@b.test\r\nTo: y@remote.test\r\nSubject: {marker}\r\n\r\nx\r\n").encode()
    assert s.submit(snd, ctype="message/rfc822", auth=creds["a"])[0] == 403
    # a mailbox token sending as someone else, JSON and raw
    code, _, _ = s.submit({"from": "bob@mailflow.test", "to": "y@remote.test", "subject": marker, "text": "x"},
                          auth=creds["alice"])
    assert code == 403
    own_env = (f"From: bob@mailflow.test\r\nTo: y@remote.test\r\nSubject: {marker}\r\n\r\nx\r\n").encode()
    code, _, _ = http("POST", f"{s.api}/v1/messages?from=alice@mailflow.test", own_env,
                      ctype="message/rfc822", auth=creds["alice"])
    assert code == 403
    assert not topic_has(s, "submissions", marker)


def test_mailbox_token_reads_only_its_own_mailbox(s: Stack, creds) -> None:
    code, doc, _ = s.submit({"from": "Alice <alice@mailflow.test>", "to": "bob@mailflow.test",
                             "subject": "hi bob", "text": "from alice"}, auth=creds["alice"])
    assert code == 202, doc
    msg_id = doc["id"]
    wait_for(lambda: s.mailbox("bob@mailflow.test", auth=creds["bob"])["total"] >= 1, 60, what="bob's inbox")
    assert msg_id in [m["id"] for m in s.mailbox("bob@mailflow.test", auth=creds["bob"])["messages"]]
    wait_for(lambda: s.mailbox("alice@mailflow.test", "sent", auth=creds["alice"])["total"] >= 1, 60,
             what="alice's Sent")
    base = f"{s.api}/v1/mailboxes/bob@mailflow.test/messages"
    for path in ("", f"/{msg_id}", f"/{msg_id}/raw", f"/{msg_id}/attachments/0"):
        assert http("GET", base + path, auth=creds["alice"])[0] == 403, path
        assert http("GET", base + path, auth=creds["a"])[0] == 403, path  # a domain key reads no mailbox
    assert http("GET", f"{base}/{msg_id}", auth=creds["bob"])[0] == 200
    who = http("GET", f"{s.api}/v1/whoami", auth=creds["bob"])[1]
    assert who["kind"] == "token" and who["address"] == "bob@mailflow.test" and "hash" not in who


def test_status_only_for_the_senders_credentials(s: Stack, creds) -> None:
    code, doc, _ = s.submit({"from": "svc@a.test", "to": "carol@mailflow.test", "text": "x"}, auth=creds["a"])
    assert code == 202
    url = f"{s.api}/v1/messages/{doc['id']}"
    wait_for(lambda: http("GET", url, auth=creds["a"])[0] == 200, 60, what="status")
    assert http("GET", url, auth=creds["b"])[0] == 403
    assert http("GET", url, auth=creds["alice"])[0] == 403
    assert http("GET", url)[0] == 200  # the admin key
    code, doc, _ = s.submit({"from": "alice@mailflow.test", "to": "carol@mailflow.test", "text": "x"},
                            auth=creds["alice"])
    url = f"{s.api}/v1/messages/{doc['id']}"
    wait_for(lambda: http("GET", url, auth=creds["alice"])[0] == 200, 60, what="status")
    assert http("GET", url, auth=creds["bob"])[0] == 403


def test_revoked_key_is_401(s: Stack) -> None:
    key, rec = auth.create_key(s.settings(), ["rev.test"], name="to-revoke")
    doc = {"from": "x@rev.test", "to": "y@remote.test", "text": "x"}
    assert s.submit(doc, auth=key)[0] == 202
    auth.revoke(s.settings(), rec["id"])
    wait_for(lambda: s.submit(doc, auth=key)[0] == 401, 15, what="revocation to take effect")
    code, body, _ = s.submit(doc, auth=key)
    assert code == 401 and "revoked" in body["error"]["message"]
    listed = auth.read_all(s.settings())[rec["id"]]
    assert listed["revoked"] and "hash" in listed and key.split("_")[2] not in orjson.dumps(listed).decode()


def test_bcc_never_in_stored_headers_and_message_ids(s: Stack, creds) -> None:
    code, doc, _ = s.submit({"from": "svc@a.test", "to": "dora@mailflow.test", "bcc": ["hidden@mailflow.test"],
                             "subject": "bcc test", "text": "x"}, auth=creds["a"])
    assert code == 202
    raw_id = f"<theirs-{uuid.uuid4().hex}@a.test>"
    raw = (f"From: svc@a.test\r\nTo: dora@mailflow.test\r\nBcc: hidden@mailflow.test,\r\n other@mailflow.test\r\n"
           f"Subject: raw bcc\r\nMessage-ID: {raw_id}\r\n\r\nbody\r\n").encode()
    code2, doc2, _ = s.submit(raw, ctype="message/rfc822", auth=creds["a"])
    assert code2 == 202
    for box in ("dora@mailflow.test", "hidden@mailflow.test"):
        wait_for(lambda b=box: s.mailbox(b)["total"] >= 2, 60, what=f"{box} to get both")
        for msg_id in (doc["id"], doc2["id"]):
            data = raw_bytes(s, box, msg_id)
            head = data.split(b"\r\n\r\n")[0].lower()
            assert b"\nbcc:" not in head and not head.startswith(b"bcc:") and b"hidden@" not in head
    assert f"<{doc['id']}@".encode() in raw_bytes(s, "dora@mailflow.test", doc["id"])  # ours for JSON
    assert raw_id.encode() in raw_bytes(s, "dora@mailflow.test", doc2["id"])  # theirs kept for raw
    assert s.mailbox("other@mailflow.test")["total"] == 1


def test_html_is_sanitised_and_attachments_download(s: Stack, creds) -> None:
    data = os.urandom(3000)
    code, doc, _ = s.submit({"from": "alice@mailflow.test", "to": "erin@mailflow.test", "subject": "html",
                             "html": '<p onclick="x()">hi<script>alert(1)</script><img src="https://t.test/p.gif"></p>',
                             "attachments": [{"filename": "räport.bin", "content_type": "application/pdf",
                                              "content_base64": base64.b64encode(data).decode()}]},
                            auth=creds["alice"])
    assert code == 202
    erin = auth.create_token(s.settings(), "erin@mailflow.test")[0]
    wait_for(lambda: s.mailbox("erin@mailflow.test", auth=erin)["total"] >= 1, 60, what="erin's inbox")
    base = f"{s.api}/v1/mailboxes/erin@mailflow.test/messages/{doc['id']}"
    code, msg, _ = http("GET", base, auth=erin)
    assert code == 200 and "<script" in msg["html"]  # as sent
    assert "<script" not in msg["html_safe"] and "onclick" not in msg["html_safe"]
    assert msg["remote_blocked"] == 1 and "hi" in msg["html_safe"]
    code, body, hdrs = http("GET", f"{base}/attachments/0", auth=erin)
    assert code == 200 and body == data
    assert hdrs["Content-Disposition"].startswith("attachment;") and "r%C3%A4port.bin" in hdrs["Content-Disposition"]
    assert hdrs["X-Content-Type-Options"] == "nosniff" and hdrs["Content-Security-Policy"] == "sandbox"
    assert http("GET", f"{base}/attachments/1", auth=erin)[0] == 404


def test_idempotency_key(s: Stack, creds) -> None:
    idem = f"order-{uuid.uuid4().hex}"
    marker = f"m-{uuid.uuid4().hex}"
    doc = {"from": "svc@a.test", "to": "frank@mailflow.test", "subject": marker, "text": "once"}
    h = {"Idempotency-Key": idem}
    code, first, _ = s.submit(doc, auth=creds["a"], headers=h)
    assert code == 202
    code, again, hdrs = s.submit(doc, auth=creds["a"], headers=h)
    assert code == 202 and again["id"] == first["id"] and hdrs.get("Idempotent-Replayed") == "true"
    # same key, different request: 409, nothing sent
    code, body, _ = s.submit({**doc, "text": "changed"}, auth=creds["a"], headers=h)
    assert code == 409 and body["error"]["code"] == "idempotency_conflict"
    # the same key under another credential is another request
    code, other, _ = s.submit({**doc, "from": "svc@b.test"}, auth=creds["b"], headers=h)
    assert code == 202 and other["id"] != first["id"]
    # racing identical requests get one id
    idem2 = f"race-{uuid.uuid4().hex}"
    doc2 = {**doc, "subject": marker + "-race"}
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda _: s.submit(doc2, auth=creds["a"], headers={"Idempotency-Key": idem2}),
                              range(8)))
    assert {r[0] for r in results} == {202} and len({r[1]["id"] for r in results}) == 1
    # survives an API restart (the map is on the compacted `idempotency` topic)
    s.kill("api")
    s.start_api()
    code, after, _ = s.submit(doc, auth=creds["a"], headers=h)
    assert code == 202 and after["id"] == first["id"]
    assert s.submit({**doc, "text": "changed"}, auth=creds["a"], headers=h)[0] == 409
    # nothing sent twice
    records = submissions_with(s, marker)
    assert sorted(r["id"] for r in records) == sorted([first["id"], other["id"], results[0][1]["id"]])
    wait_for(lambda: s.mailbox("frank@mailflow.test")["total"] >= 3, 60, what="frank's inbox")
    assert s.mailbox("frank@mailflow.test")["total"] == 3
    assert s.submit(doc, auth=creds["a"], headers={"Idempotency-Key": "bad key with spaces"})[0] == 400
