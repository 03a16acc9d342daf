"""Issue 19's findings as regressions against the real API on the real broker.

Shares the session's submission stack (ratelimit, validate, store, status) from
tests/conftest.py; each test uses its own mailboxes and senders.
"""

from __future__ import annotations

import base64
import itertools
import time
import uuid
from typing import Any

import orjson
import pytest
from harness import Stack, get_raw_target, http, wait_for


@pytest.fixture(scope="module")
def s(submission_stack: Stack) -> Stack:
    return submission_stack


@pytest.fixture(scope="module")
def two_boxes(s: Stack) -> dict[str, Any]:
    """A victim and an attacker mailbox, each with a token and one message; the
    victim's message carries a marker in its subject, text and attachment."""
    tag = uuid.uuid4().hex[:8]
    victim, attacker = f"victim-{tag}@mailflow.test", f"attacker-{tag}@mailflow.test"
    marker = f"secret-{uuid.uuid4().hex}"
    code, v, _ = s.submit({"from": f"sec-{tag}@a.test", "to": victim, "subject": marker, "text": marker,
                           "attachments": [{"filename": "s.txt", "content_type": "text/plain",
                                            "content_base64": base64.b64encode(marker.encode()).decode()}]})
    assert code == 202, v
    code, a, _ = s.submit({"from": f"sec-{tag}@a.test", "to": attacker, "subject": "mine", "text": "mine"})
    assert code == 202, a
    out = {"victim": victim, "attacker": attacker, "marker": marker, "vid": v["id"], "aid": a["id"],
           "vtok": s.token(victim), "atok": s.token(attacker)}
    for box, tok in ((victim, out["vtok"]), (attacker, out["atok"])):
        wait_for(lambda b=box, t=tok: s.mailbox(b, auth=t)["total"] >= 1, 60, what=f"{box}'s inbox")
    return out


# Every way we know of to write a dot and a slash in a path segment: plain,
# percent-encoded in either case, double-encoded, overlong UTF-8, %u, and Unicode
# look-alikes both percent-encoded and as raw UTF-8 bytes; backslashes too.
DOTS = [".", "%2e", "%2E", "%252e", "%252E", "%c0%ae", "%u002e", "%EF%BC%8E", "\uff0e", "%E2%80%A4"]
SLASHES = ["/", "%2f", "%2F", "%252f", "%252F", "\\", "%5c", "%5C", "%255C", "%c0%af",
           "%EF%BC%8F", "\uff0f", "%E2%88%95", "\u2215"]


def _ups(depth: int, dot: str, slash: str) -> str:
    return (dot + dot + slash) * depth


def traversal_targets(b: dict[str, Any]) -> list[str]:
    """Request targets that walk out of the attacker's mailbox into the victim's,
    or to a worker's own pages, in every encoding above."""
    victim, attacker, vid, aid = b["victim"], b["attacker"], b["vid"], b["aid"]
    mine = f"/v1/mailboxes/{attacker}/messages"
    out: list[str] = []
    for dot, sl in itertools.product(DOTS, SLASHES):
        box = f"{victim}{sl}messages"
        for depth in (2, 3):
            up = _ups(depth, dot, sl)
            out += [f"{mine}/{up}{box}", f"{mine}/{up}{box}{sl}{vid}", f"{mine}/{up}{box}{sl}{vid}/raw",
                    f"{mine}/{up}{box}{sl}{vid}{sl}raw",
                    f"{mine}/{aid}/attachments/{up}{up}{box}{sl}{vid}{sl}attachments{sl}0"]
        # Mixed: the two dots of one `..` written differently, and the victim in capitals.
        mixed = (DOTS[0] + dot + sl) * 2
        out += [f"{mine}/{mixed}{victim.upper()}{sl}messages{sl}{vid}",
                f"/v1/mailboxes/{attacker}{sl}{dot}{dot}{sl}{victim}/messages",
                f"/v1/mailboxes/{attacker}{sl}{dot}{dot}{sl}{dot}{dot}{sl}{victim}/messages/{vid}"]
        # The worker's own pages (Faust's /router/, /table/, /stats/), from the
        # id, the address and the status id.
        for page in ("router", "table", "stats", ""):
            out += [f"{mine}/{_ups(4, dot, sl)}{page}{sl}", f"/v1/mailboxes/{_ups(2, dot, sl)}{page}/messages",
                    f"/v1/messages/{_ups(2, dot, sl)}{page}{sl}"]
    return out


def _target_bytes(target: str) -> bytes:
    return target.encode("utf-8")  # raw look-alikes go out as their UTF-8 bytes


def _only_own(b: dict[str, Any], status: int, body: bytes) -> str | None:
    """Why this answer broke the rule (victim data or a worker page), or None."""
    if status >= 500:
        return f"answered {status}"
    if b["marker"].encode() in body or b["victim"].encode() in body.lower() or b["vid"].encode() in body:
        return "carries the victim's data"
    if status == 200:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return "200 that is not one of the attacker's own answers"
        if doc.get("mailbox") != b["attacker"] and doc.get("id") != b["aid"]:
            return "200 that is not one of the attacker's own answers (a worker page?)"
    return None


def test_generated_traversal_paths_never_reach_another_mailbox_or_a_worker_page(s: Stack, two_boxes) -> None:
    b = two_boxes
    # The detector can fail: the victim reads its own marker, the attacker its own message.
    for path in (f"/v1/mailboxes/{b['victim']}/messages/{b['vid']}", f"/v1/mailboxes/{b['victim']}/messages"):
        code, _, body = get_raw_target(s.api, path.encode(), b["vtok"])
        assert code == 200 and b["marker"].encode() in body, (path, code, body[:200])
    code, _, body = get_raw_target(s.api, f"/v1/mailboxes/{b['attacker']}/messages/{b['aid']}".encode(), b["atok"])
    assert code == 200 and _only_own(b, code, body) is None
    assert _only_own(b, *get_raw_target(s.api, f"/v1/mailboxes/{b['victim']}/messages".encode(),
                                        b["vtok"])[::2]) is not None
    targets = traversal_targets(b)
    assert len(targets) > 1000
    bad = []
    for target in targets:
        code, _, body = get_raw_target(s.api, _target_bytes(target), b["atok"])
        if why := _only_own(b, code, body):
            bad.append((target, code, why, body[:120]))
    assert not bad, f"{len(bad)} of {len(targets)} paths, e.g. {bad[:5]}"
    # An admin key reads every mailbox, but no traversal takes it to a worker page.
    admin_bad = []
    for target in targets:
        if any(p in target for p in ("router", "table", "stats")):
            code, _, body = get_raw_target(s.api, _target_bytes(target), s.key)
            if code >= 500 or (code == 200 and b"mailbox" not in body and b'"id"' not in body):
                admin_bad.append((target, code, body[:120]))
    assert not admin_bad, admin_bad[:5]


def test_ids_and_addresses_are_validated_before_anything_is_forwarded(s: Stack, two_boxes) -> None:
    b = two_boxes
    mine = f"{s.api}/v1/mailboxes/{b['attacker']}/messages"
    for bad_id in ("01abc", b["aid"].upper(), b["aid"][:-1] + "u", b["aid"] + "0", "%2e%2e"):
        for suffix in ("", "/raw", "/attachments/0"):
            code, body, _ = http("GET", f"{mine}/{bad_id}{suffix}", auth=b["atok"])
            assert code == 400 and body["error"]["fields"].keys() == {"id"}, (bad_id, suffix, body)
        code, body, _ = http("GET", f"{s.api}/v1/messages/{bad_id}", auth=b["atok"])
        assert code == 400 and "id" in body["error"]["fields"], body
    code, body, _ = http("GET", f"{s.api}/v1/mailboxes/not-an-address/messages", auth=b["atok"])
    assert code == 400 and "address" in body["error"]["fields"]
    for n in ("-1", "+1", "%D9%A1", "1.0", "%201"):  # int() would take some of these
        code, _, body = get_raw_target(s.api, f"/v1/mailboxes/{b['attacker']}/messages/{b['aid']}"
                                       f"/attachments/{n}".encode(), b["atok"])
        assert code == 400 and "n" in orjson.loads(body)["error"]["fields"], (n, body)
    # Still 401 before anything when there is no credential.
    assert http("GET", f"{mine}/..%2F..%2F{b['victim']}%2Fmessages", auth=None)[0] == 401


def test_local_parts_of_our_domains_match_case_insensitively(s: Stack) -> None:
    tag = uuid.uuid4().hex[:8]
    lower = f"carol.case-{tag}@mailflow.test"
    shouting = lower.upper().replace("MAILFLOW.TEST", "mailflow.test")
    token = s.token(lower)
    code, doc, _ = s.submit({"from": f"case-{tag}@a.test", "to": [shouting], "cc": [lower],
                             "subject": "case", "text": "x"})
    assert code == 202, doc
    listing = wait_for(lambda: (m := s.mailbox(lower, auth=token))["total"] >= 1 and m, 60, what="the inbox")
    assert [m["id"] for m in listing["messages"]] == [doc["id"]]  # one mailbox, one copy
    assert s.mailbox(shouting, auth=token)["messages"] == listing["messages"]  # readable under either case
    code, msg, _ = http("GET", f"{s.api}/v1/mailboxes/{shouting}/messages/{doc['id']}", auth=token)
    assert code == 200 and msg["id"] == doc["id"]
    # Both recipients, as they were addressed, reach "stored".
    st = wait_for(lambda: (x := s.status(doc["id"])) and all(
        r["state"] == "stored" for r in x["recipients"].values()) and x, 60, what="stored")
    assert set(st["recipients"]) == {shouting, lower}
    # A token for the capitalised address reads the same mailbox.
    assert s.mailbox(lower, auth=s.token(shouting))["total"] == 1


# ---- malformed HTTP, clients that go away or crawl (findings 4, 5, 9) -----------------------
def _post_head(auth: str, length: int, extra: bytes = b"") -> bytes:
    return (b"POST /v1/messages HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + auth.encode() + b"\r\nContent-Length: " + str(length).encode()
            + b"\r\nConnection: close\r\n" + extra)


def _is_json_error(status: int, headers: dict[str, str], body: bytes, want: int) -> bool:
    if status != want or not headers.get("Content-Type", "").startswith("application/json"):
        return False
    err = orjson.loads(body)["error"]
    return isinstance(err["code"], str) and isinstance(err["message"], str)


def test_the_http_parser_s_refusals_are_json_and_never_echo_the_request(s: Stack) -> None:
    from harness import raw_http

    echo = b"ECHO-" + uuid.uuid4().hex.encode()
    cases = {
        "URL over 8 KB": b"GET /v1/messages/" + echo + b"x" * 9000 + b" HTTP/1.1\r\nHost: t\r\n",
        # With a credential, so that the handler reads the body (without one it may
        # answer 401 before the parser meets the bad chunk).
        "bad chunk size": (b"POST /v1/messages HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                           b"Content-Type: application/json\r\nAuthorization: Bearer " + s.key.encode()
                           + b"\r\n", b"zz" + echo + b"\r\n{}\r\n0\r\n\r\n"),
        "duplicate Content-Length": _post_head(s.key, 2) + b"Content-Length: 2\r\nX-E: " + echo + b"\r\n",
        "Brotli body": _post_head(s.key, 2) + b"Content-Encoding: br\r\nX-E: " + echo + b"\r\n",
        "a control character in the target": b"GET /v1/" + echo + b"\x01 HTTP/1.1\r\nHost: t\r\n",
    }
    for what, case in cases.items():
        head, body = case if isinstance(case, tuple) else (case, b"{}")
        status, headers, answer = raw_http(s.api, head, body)
        assert _is_json_error(status, headers, answer, 400), (what, status, answer[:200])
        assert echo not in answer, what


def test_a_bad_chunk_after_the_handler_started_reading_is_400_at_once(s: Stack) -> None:
    """The headers first, then (once the handler waits for the body) a chunk size
    that is not one: the handler's read fails, not waits out the body timeout."""
    from harness import raw_http

    head = (b"POST /v1/messages HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer " + s.key.encode() + b"\r\n")
    started = time.monotonic()
    status, headers, answer = raw_http(s.api, head, b"zz\r\n{}\r\n0\r\n\r\n", timeout=20, pause=0.5)
    assert _is_json_error(status, headers, answer, 400), (status, answer[:200])
    assert orjson.loads(answer)["error"]["code"] == "bad_body"
    assert time.monotonic() - started < 10


def test_405_names_the_allowed_methods(s: Stack) -> None:
    code, body, headers = http("DELETE", f"{s.api}/v1/messages")
    assert code == 405 and headers["Allow"] == "POST" and body["error"]["code"]
    code, _, headers = http("PUT", f"{s.api}/v1/whoami")
    assert code == 405 and "GET" in headers["Allow"]


def _api_500s(s: Stack) -> float:
    code, text, _ = http("GET", f"{s.api}/metrics")
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith("mailflow_api_requests_total{") and 'status="500"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_corrupt_gzip_body_is_400_and_a_client_leaving_mid_body_is_no_error(s: Stack) -> None:
    from harness import raw_http

    before = _api_500s(s)
    bad = b"\x1f\x8b\x08\x00" + b"not gzip at all" * 10
    status, headers, body = raw_http(s.api, _post_head(s.key, len(bad), b"Content-Encoding: gzip\r\n"), bad)
    assert _is_json_error(status, headers, body, 400) and orjson.loads(body)["error"]["code"] == "bad_body"
    log = s.data_dir / "logs" / "api.log"
    mark = log.stat().st_size
    import socket as _socket

    for _ in range(5):
        host, port = s.api.removeprefix("http://").split(":")
        with _socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(_post_head(s.key, 100000) + b"\r\n" + b'{"from": "x@a.test", ')
    assert wait_for(lambda: http("GET", f"{s.api}/healthz")[0] == 200, 10)
    import time

    time.sleep(0.5)  # the server notices the closed connections
    assert _api_500s(s) == before
    tail = log.read_bytes()[mark:]
    assert b"Traceback" not in tail and b" ERROR " not in tail, tail[-2000:]


def test_slow_clients_are_timed_out(kafka: str, work_dir) -> None:
    """Headers that crawl: the connection is closed; a body that crawls: 408."""
    import socket as _socket
    import time

    stack = Stack(work_dir, kafka, api_header_timeout="1s", api_body_timeout="1s")
    try:
        stack.start([])
        host, port = stack.api.removeprefix("http://").split(":")
        t0 = time.monotonic()
        with _socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
            closed = False
            while time.monotonic() - t0 < 8:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    closed = True
                    break
                sock.settimeout(0.3)
                try:
                    if sock.recv(1024) == b"":
                        closed = True
                        break
                except TimeoutError:
                    pass
        assert closed and time.monotonic() - t0 < 5, "a slow-headers connection stayed open"
        with _socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(_post_head(stack.key, 1000) + b"\r\n" + b"{")
            sock.settimeout(8)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_timeout"
    finally:
        stack.stop()


# ---- what a message may say about its sender (findings 2, 3, 6, 7, 8) -------------------------
@pytest.fixture(scope="module")
def sender(s: Stack) -> dict[str, str]:
    """A mailbox token for a local sender, whose Sent folder shows each envelope."""
    tag = uuid.uuid4().hex[:8]
    address = f"sender-{tag}@mailflow.test"
    return {"address": address, "token": s.token(address), "tag": tag, "inbox": f"rcpt-{tag}@mailflow.test"}


def _raw_submit(s: Stack, raw: bytes, auth: str) -> tuple[int, Any]:
    code, body, _ = http("POST", f"{s.api}/v1/messages", raw, ctype="message/rfc822", auth=auth)
    return code, body


def _stored_raw(s: Stack, box: str, msg_id: str) -> bytes:
    def get() -> bytes | None:
        from urllib.parse import quote

        code, body, _ = http("GET", f"{s.api}/v1/mailboxes/{quote(box, safe='@')}/messages/{msg_id}/raw")
        return body if code == 200 else None
    return wait_for(get, 60, what=f"{msg_id} in {box}")


def test_raw_headers_a_receiver_could_read_otherwise_are_400(s: Stack, sender) -> None:
    me, tok, to = sender["address"], sender["token"], sender["inbox"]
    cases = {
        "obsolete From last": f"From: {me}\r\nTo: {to}\r\nSubject: t\r\nFrom : ceo@foreign.test\r\n\r\nb\r\n",
        "obsolete From first": f"From : ceo@foreign.test\r\nFrom: {me}\r\nTo: {to}\r\n\r\nb\r\n",
        "two From": f"From: {me}\r\nTo: {to}\r\nFrom: ceo@foreign.test\r\n\r\nb\r\n",
        "a line that is no field": f"From: {me}\r\nTo: {to}\r\nceo@foreign.test\r\n\r\nb\r\n",
        "an encoded word as address": f"From: {me}\r\nSender: =?utf-8?b?Y2Vv?=@mailflow.test\r\nTo: {to}\r\n\r\nb\r\n",
    }
    for what, text in cases.items():
        code, body = _raw_submit(s, text.encode(), tok)
        assert code == 400 and body["error"]["code"] == "bad_headers", (what, code, body)
    # Invalid UTF-8 in an address field (finding 7), for the admin key too.
    code, body = _raw_submit(s, f"From: \xffrob@mailflow.test\r\nTo: {to}\r\n\r\nb\r\n".encode("latin-1"), s.key)
    assert code == 400 and "UTF-8" in body["error"]["fields"]["from"], body
    # A foreign Resent-From is a sender like From: 403.
    code, body = _raw_submit(s, f"From: {me}\r\nResent-From: ceo@foreign.test\r\nTo: {to}\r\n\r\nb\r\n".encode(), tok)
    assert code == 403, body


def test_json_addresses_arrive_as_given_and_ascii_stays_ascii(s: Stack, sender) -> None:
    me, tok, to = sender["address"], sender["token"], sender["inbox"]
    code, body, _ = s.submit({"from": "=?utf-8?b?Y2VvQGZvcmVpZ24udGVzdA==?=@mailflow.test", "to": to,
                              "text": "x"})
    assert code == 400 and "encoded word" in body["error"]["fields"]["from"]
    quoted = f'"john doe {sender["tag"]}"@mailflow.test'
    code, doc, _ = s.submit({"from": me, "to": [to, quoted, f"y-{sender['tag']}@xn--bcher-kva.test"],
                             "reply_to": quoted, "subject": "as given", "text": "x"}, auth=tok)
    assert code == 202, doc
    raw = _stored_raw(s, to, doc["id"])
    head = raw.split(b"\r\n\r\n")[0]
    assert f"To: {to}, {quoted},".encode() in head and f"Reply-To: {quoted}\r\n".encode() in head
    assert f"y-{sender['tag']}@xn--bcher-kva.test".encode() in head and "bücher".encode() not in head
    assert head.isascii()
    sent = wait_for(lambda: [m for m in s.mailbox(me, "sent", auth=tok)["messages"] if m["id"] == doc["id"]],
                    60, what="the Sent copy")
    assert sent[0]["recipients"] == [to, quoted, f"y-{sender['tag']}@xn--bcher-kva.test"]
    # The quoted mailbox got it too: header and envelope name one mailbox.
    assert _stored_raw(s, quoted, doc["id"]).startswith(raw[:200])


def test_receiver_trace_fields_are_stripped_from_raw_submissions(s: Stack, sender) -> None:
    me, tok, to = sender["address"], sender["token"], sender["inbox"]
    raw = (f"Return-Path: <ceo@foreign.test>\r\nFrom: {me}\r\nTo: {to}\r\n"
           f"Authentication-Results: mx.foreign.test; dkim=pass header.d=foreign.test\r\n"
           f"Subject: trace\r\nAuthentication-Results: x;\r\n spf=pass\r\n\r\nbody\r\n").encode()
    code, doc = _raw_submit(s, raw, tok)
    assert code == 202, doc
    head = _stored_raw(s, to, doc["id"]).split(b"\r\n\r\n")[0]
    assert b"Authentication-Results" not in head and b"spf=pass" not in head and b"Return-Path" not in head
    assert f"From: {me}\r\n".encode() in head and b"Subject: trace" in head
