"""Sending like a good citizen, on the real broker with a real SMTP peer (issue 16):
the suppression list, RFC 8058 one-click unsubscribe, reply rules and rate limits.

One stack for the module: every remote domain is routed to one scripted aiosmtpd
peer (`Peer`), which answers by the recipient's local part. Scanning is off (the
scan stage passes mail through), the retry ladder is short.
"""

from __future__ import annotations

import email
import json
import re
import time
from collections.abc import Iterator
from email import policy
from pathlib import Path
from typing import Any

import pytest
from harness import FINAL, ScriptedPeer, Stack, http, wait_for

STAGES = ["ratelimit", "validate", "scan", "sentfolder", "deliver", "retry", "status", "webhooks"]
SENDER = "news@shop.test"
RATE_SLOW = 1.0  # the test's pause after a rate-limit reply (an operator rule)


class Peer(ScriptedPeer):
    """``gone*`` 550 5.1.1, ``policy*`` 550 5.7.1, ``busy*`` 451 4.7.650 to its first
    two RCPTs, ``later*`` 451 4.3.0 to each address's first RCPT; every RCPT is
    recorded with its time."""

    def __init__(self) -> None:
        super().__init__()
        self.rcpts: list[tuple[str, float]] = []
        self.busy_left = 2

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: ANN001
        self.rcpts.append((address, time.time()))
        local = address.split("@")[0]
        if local.startswith("gone"):
            return f"550 5.1.1 <{address}>: no such user"
        if local.startswith("policy"):
            return "550 5.7.1 message refused by policy"
        if local.startswith("later") and self.seen(address) == 1:
            return "451 4.3.0 try again later"
        if local.startswith("busy") and self.busy_left > 0:
            self.busy_left -= 1
            return "451 4.7.650 The mail server has been temporarily rate limited"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    def seen(self, address: str) -> int:
        return sum(1 for a, _ in self.rcpts if a == address)


@pytest.fixture(scope="module")
def peer() -> Iterator[Peer]:
    p = Peer().start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def stack(kafka: str, work_dir: Path, peer: Peer) -> Iterator[Stack]:
    rules = work_dir / "bounce-rules.json"
    rules.write_text(json.dumps([{"status": "4.7.650", "class": "rate_limited", "slow": f"{RATE_SLOW}s"}]))
    s = Stack(work_dir, kafka, smtp_routes=f"*=127.0.0.1:{peer.port}", retry_schedule="200ms,400ms,800ms",
              max_queue_age="60s", rate_limit="100000/60s", scanners="none", smtp_timeout="10s",
              bounce_rules=str(rules), webhook_allow_private="true",
              webhook_retry_schedule="300ms,600ms,1s,2s")
    s.env["MAILFLOW_PUBLIC_URL"] = s.api  # links in mail lead back to this stack's API
    try:
        yield s.start(STAGES)
    finally:
        s.stop()


def send(s: Stack, to: list[str], **extra: Any) -> str:
    code, doc, _ = s.submit({"from": SENDER, "to": to, "subject": "hi", "text": "hello", **extra})
    assert code == 202, doc
    return doc["id"]


def final(s: Stack, msg_id: str, timeout: float = 60) -> dict[str, Any]:
    def done() -> Any:
        st = s.status(msg_id)
        ok = st and st["recipients"] and all(r["state"] in FINAL for r in st["recipients"].values())
        return st if ok else None
    return wait_for(done, timeout, interval=0.3, what=f"{msg_id} to reach final states")


def suppressions(s: Stack, domain: str = "shop.test", auth: Any = True) -> dict[str, dict[str, Any]]:
    code, doc, _ = http("GET", f"{s.api}/v1/suppressions?domain={domain}", auth=auth)
    assert code == 200, doc
    return {e["address"]: e for e in doc["suppressions"]}


def test_hard_bounce_suppresses_policy_refusal_does_not(stack: Stack, peer: Peer) -> None:
    s = stack
    first = final(s, send(s, ["gone1@a.test", "policy1@a.test"]))
    gone, pol = first["recipients"]["gone1@a.test"], first["recipients"]["policy1@a.test"]
    assert gone["state"] == "bounced" and gone["detail"]["class"] == "hard"
    assert pol["state"] == "bounced" and pol["detail"]["class"] == "policy"
    listed = wait_for(lambda: suppressions(s).get("gone1@a.test"), 20, what="the suppression entry")
    assert listed["reason"] == "hard_bounce" and "5.1.1" in listed["reply"]
    assert "policy1@a.test" not in suppressions(s)
    # The bounce to the sender (null reverse-path, to the same peer) names the class.
    dsn = wait_for(lambda: [m for m in peer.messages if m[0] in ("", "<>") and b"gone1@a.test" in m[2]],
                   30, what=f"the DSN among {[(m[0], m[1]) for m in peer.messages]}")[0][2]
    assert b"X-Mailflow-Bounce-Class: hard" in dsn

    for round_ in range(2):
        st = final(s, send(s, ["gone1@a.test", "policy1@a.test", f"ok{round_}@a.test"]))
        r = st["recipients"]
        assert r["gone1@a.test"]["state"] == "suppressed"
        assert r["gone1@a.test"]["detail"]["reason"] == "hard_bounce"
        assert r["policy1@a.test"]["state"] == "bounced"
        assert r[f"ok{round_}@a.test"]["state"] == "delivered"
    assert peer.seen("gone1@a.test") == 1  # never a second RCPT
    assert peer.seen("policy1@a.test") == 3  # tried every time


def test_api_suppressions_per_credential_domain(stack: Stack, peer: Peer) -> None:
    from mailflow.api.auth import create_key

    s = stack
    shop, _ = create_key(s.settings(), ["shop.test"], name="shop")
    other, _ = create_key(s.settings(), ["other.test"], name="other")
    url = f"{s.api}/v1/suppressions"
    code, doc, _ = http("POST", url, {"domain": "shop.test", "address": "Manual@B.test", "note": "asked by phone"},
                        auth=shop)
    assert code == 201 and doc["reason"] == "api" and doc["address"] == "manual@b.test", doc
    assert http("POST", url, {"domain": "shop.test", "address": "x@b.test"}, auth=other)[0] == 403
    assert http("GET", f"{url}?domain=shop.test", auth=other)[0] == 403
    assert http("GET", f"{url}?domain=shop.test", auth=None)[0] == 401
    code, doc, _ = http("POST", url, {"domain": "shop.test", "address": "not an address", "x": 1}, auth=shop)
    assert code == 400 and {"address", "x"} <= set(doc["error"]["fields"])
    assert "manual@b.test" in suppressions(s, auth=shop)

    st = final(s, send(s, ["manual@b.test", "fine@b.test"]))
    assert st["recipients"]["manual@b.test"]["state"] == "suppressed"
    assert st["recipients"]["manual@b.test"]["detail"]["reason"] == "api"
    assert st["recipients"]["fine@b.test"]["state"] == "delivered"
    assert peer.seen("manual@b.test") == 0

    assert http("DELETE", f"{url}/shop.test/manual@b.test", auth=other)[0] == 403
    assert http("DELETE", f"{url}/shop.test/manual@b.test", auth=shop)[0] == 200
    assert http("DELETE", f"{url}/shop.test/manual@b.test", auth=shop)[0] == 404
    assert "manual@b.test" not in suppressions(s, auth=shop)
    # Removed: the deliver stage sees the tombstone and sends again.
    def delivered_again() -> bool:
        st = final(s, send(s, ["manual@b.test"]))
        return st["recipients"]["manual@b.test"]["state"] == "delivered"
    wait_for(delivered_again, 30, interval=1, what="delivery after the entry was removed")


def unsubscribe_link(raw: bytes) -> str:
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    m = re.match(r"<(https?://[^>]+)>", str(msg["List-Unsubscribe"]))
    assert m, msg["List-Unsubscribe"]
    return m.group(1)


def test_one_click_unsubscribe(stack: Stack, peer: Peer) -> None:
    s = stack
    st = final(s, send(s, ["u1@c.test", "u2@c.test"], unsubscribe=True))
    assert {r["state"] for r in st["recipients"].values()} == {"delivered"}
    copies = {m[1][0]: m[2] for m in peer.messages if m[1] and m[1][0] in ("u1@c.test", "u2@c.test")}
    assert set(copies) == {"u1@c.test", "u2@c.test"}  # each its own transaction
    assert all(len(m[1]) == 1 for m in peer.messages if set(m[1]) & {"u1@c.test", "u2@c.test"})
    link1, link2 = unsubscribe_link(copies["u1@c.test"]), unsubscribe_link(copies["u2@c.test"])
    assert link1 != link2 and link1.startswith(f"{s.api}/v1/unsubscribe/")

    # A GET (a mail scanner following the link) shows a page and changes nothing.
    code, page, _ = http("GET", link1, auth=None)
    assert code == 200 and b"u1@c.test" in page and b"<form" in page
    # Forged and altered tokens.
    token = link1.rsplit("/", 1)[1]
    forged = link1[: -len(token)] + token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    form = "application/x-www-form-urlencoded"
    assert http("POST", forged, b"List-Unsubscribe=One-Click", ctype=form, auth=None)[0] == 404
    assert http("GET", forged, auth=None)[0] == 404
    assert http("POST", f"{s.api}/v1/unsubscribe/bm90aGluZw.AAAA", b"List-Unsubscribe=One-Click",
                ctype=form, auth=None)[0] == 404
    assert http("POST", link1, b"something=else", ctype=form, auth=None)[0] == 400
    assert "u1@c.test" not in suppressions(s)

    code, body, _ = http("POST", link1, b"List-Unsubscribe=One-Click", ctype=form, auth=None)
    assert code == 200, body
    assert suppressions(s)["u1@c.test"]["reason"] == "unsubscribe"
    assert "u2@c.test" not in suppressions(s)
    before = peer.seen("u1@c.test")
    st = final(s, send(s, ["u1@c.test", "u2@c.test"], unsubscribe=True))
    assert st["recipients"]["u1@c.test"]["state"] == "suppressed"
    assert st["recipients"]["u1@c.test"]["detail"]["reason"] == "unsubscribe"
    assert st["recipients"]["u2@c.test"]["state"] == "delivered"
    assert peer.seen("u1@c.test") == before


def test_rate_limit_slows_the_destination_without_spending_attempts(stack: Stack, peer: Peer) -> None:
    s = stack
    st = final(s, send(s, ["busy1@rl.test"]), timeout=60)
    assert st["recipients"]["busy1@rl.test"]["state"] == "delivered"
    deferred = [e for e in st["timeline"] if e["state"] == "deferred"]
    assert len(deferred) >= 2, st["timeline"]
    assert all(e["detail"]["class"] == "rate_limited" and e["detail"]["attempt"] == 0 for e in deferred)
    times = [t for a, t in peer.rcpts if a == "busy1@rl.test"]
    assert len(times) == 3  # two rate-limit replies, then the delivery; no attempt in the pauses
    # The pause doubles: RATE_SLOW after the first reply, twice that after the second
    # (a retry tier alone would come back after 0.2 s).
    assert times[1] - times[0] >= RATE_SLOW * 0.9
    assert times[2] - times[1] >= 2 * RATE_SLOW * 0.9
    assert any("paused until" in e["detail"]["error"] for e in deferred)


class Receiver:
    """A webhook receiver (aiohttp, its own loop in a thread) that checks every
    signature with `hmac` as a user's code would; can go down and come back."""

    def __init__(self) -> None:
        from harness import free_port

        self.port = free_port()
        self.secret = ""
        self.got: dict[str, dict[str, Any]] = {}  # event_id -> body
        self.posts = 0
        self.bad: list[str] = []
        self._stop: Any = None

    async def _handle(self, request: Any) -> Any:
        import hashlib
        import hmac

        from aiohttp import web

        raw = await request.read()
        self.posts += 1
        parts = dict(p.split("=", 1) for p in request.headers.get("Mailflow-Signature", "").split(","))
        want = hmac.new(self.secret.encode(), parts.get("t", "").encode() + b"." + raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, parts.get("v1", "")) or abs(time.time() - int(parts["t"])) > 300:
            self.bad.append(request.headers.get("Mailflow-Signature", ""))
            return web.Response(status=400)
        body = json.loads(raw)
        assert body["event_id"] == request.headers["Mailflow-Event-Id"]
        self.got[body["event_id"]] = body
        return web.Response(text="ok")

    def up(self) -> None:
        import asyncio
        import threading

        from aiohttp import web

        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/hook", self._handle)
            runner = web.AppRunner(app)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            stop = loop.create_future()
            self._stop = (loop, stop)
            ready.set()
            loop.run_until_complete(stop)
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        assert ready.wait(10), "the receiver did not start"

    def down(self) -> None:
        loop, stop = self._stop
        loop.call_soon_threadsafe(stop.set_result, None)
        self._thread.join(10)


def expected_events(s: Stack, ids: list[str], states: set[str]) -> set[tuple[str, str, str]]:
    """(event_id, recipient, state) of every state change of `ids` a webhook for `states` gets."""
    from mailflow.webhooks import event_id

    out = set()
    for i in ids:
        for e in s.status(i)["timeline"]:
            if e["state"] in states:
                for r in e.get("recipients") or []:
                    out.add((event_id(i, r, e["state"], e["ts"]), r, e["state"]))
    return out


def test_signed_webhooks_survive_receiver_outage_and_kill(stack: Stack, peer: Peer) -> None:
    from mailflow.api.auth import create_key

    s = stack
    shop, _ = create_key(s.settings(), ["shop.test"], name="hooks")
    other, _ = create_key(s.settings(), ["other.test"], name="other")
    rx = Receiver()
    rx.up()
    states = ["delivered", "bounced", "deferred", "suppressed"]
    code, doc, _ = http("POST", f"{s.api}/v1/webhooks", {"url": f"http://127.0.0.1:{rx.port}/hook",
                                                         "events": states}, auth=shop)
    assert code == 201 and doc["secret"].startswith("whsec_"), doc
    rx.secret, hook_id = doc["secret"], doc["id"]
    code, doc, _ = http("GET", f"{s.api}/v1/webhooks", auth=shop)
    assert code == 200 and [h["id"] for h in doc["webhooks"]] == [hook_id]
    assert "secret" not in doc["webhooks"][0]
    assert http("GET", f"{s.api}/v1/webhooks", auth=other)[1]["webhooks"] == []
    assert http("DELETE", f"{s.api}/v1/webhooks/{hook_id}", auth=other)[0] == 404
    assert http("POST", f"{s.api}/v1/webhooks", {"url": "ftp://x", "events": ["nope"]}, auth=shop)[0] == 400
    # The secret is never on Kafka in clear text.
    assert not any(rx.secret.encode() in (v or b"") for _, v in s.read_topic("webhooks"))
    time.sleep(1.5)  # the stage's view of the webhooks topic

    ids = [send(s, ["ok-w1@w.test", "gone-w1@w.test", "later-w1@w.test"])]
    final(s, ids[0])
    wait_for(lambda: "gone-w1@w.test" in suppressions(s), 20, what="the suppression")
    ids.append(send(s, ["gone-w1@w.test", "ok-w2@w.test"]))
    final(s, ids[1])
    want = expected_events(s, ids, set(states))
    assert {st for _, _, st in want} == set(states)
    wait_for(lambda: {e for e, _, _ in want} <= set(rx.got), 60, interval=0.5,
             what="the events while the receiver is up")

    # The receiver goes down; mail goes on; the webhooks stage is killed -9 and restarted.
    rx.down()
    ids_down = [send(s, [f"ok-d{i}@w.test", f"later-d{i}@w.test"]) for i in range(3)]
    for i in ids_down:
        final(s, i)
    s.kill("webhooks")
    s.start_stage("webhooks")
    time.sleep(3)
    rx.up()
    want_all = expected_events(s, ids + ids_down, set(states))
    wait_for(lambda: {e for e, _, _ in want_all} <= set(rx.got), 120, interval=0.5,
             what=f"every event after the outage (missing "
                  f"{sorted(r for e, r, _ in want_all if e not in rx.got)})")
    assert rx.bad == []
    for e, r, st in want_all:
        body = rx.got[e]
        assert (body["recipient"], body["state"]) == (r, st) and body["message_id"] in ids + ids_down
    assert all(rx.got[e]["class"] == "hard" for e, _, st in want_all if st == "bounced")
    # Mail from domains the key does not cover was never announced to it.
    assert all(b["sender"] == SENDER for b in rx.got.values())
    assert http("DELETE", f"{s.api}/v1/webhooks/{hook_id}", auth=shop)[0] == 200
    assert http("GET", f"{s.api}/v1/webhooks", auth=shop)[1]["webhooks"] == []
    rx.down()
