"""DKIM through the whole pipeline: keys made with `mailflow domains add`, the records
`mailflow domains dns --json` prints served by a dnsmasq of the test's own, every
message the real aiosmtpd peer receives verified with dkimpy through that DNS.

One stack (``MAILFLOW_DKIM=sign-if-key``, scanning off, MX lookups through the test
DNS to the peer): multipart with an attachment, a line starting with a dot, 8-bit
UTF-8 text, a bounce; a 451 and its retry (the same bytes twice); a rotation; the
admin API; and a scan of every topic, log and answer for the private keys. A second
API process on the same stack runs with ``MAILFLOW_DKIM=required``.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import dns.resolver
import orjson
import pytest
from harness import ROOT, ScriptedPeer, Stack, free_port, http, settled, wait_for
from testca import LocalDns, txt_record
from testca import run_cli as cli

from mailflow.mta import domains as dom
from mailflow.mta.keyring import operator_key

MX = "mx-host=dkim.test,mx.dkim.test,10\nhost-record=mx.dkim.test,127.0.0.1\n"


class RecordingPeer(ScriptedPeer):
    """Keeps the bytes of every DATA, the refused ones too."""

    def __init__(self) -> None:
        super().__init__()
        self.data: list[bytes] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001
        self.data.append(envelope.original_content or envelope.content)
        return await super().handle_DATA(server, session, envelope)


def publish(dns_server: LocalDns, stack: Stack, *domains: str) -> list[dict[str, str]]:
    """Publish what `domains dns --json` prints for each domain; return those records."""
    records: list[dict[str, str]] = []
    for d in domains:
        out = cli(stack, "domains", "dns", d, "--json")
        assert out.returncode == 0, out.stderr
        records += orjson.loads(out.stdout.strip().splitlines()[-1])["records"]
    dns_server.publish("\n".join(txt_record(r["name"], r["value"]) for r in records))
    return records


@pytest.fixture(scope="module")
def world(kafka: str, work_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("dkim")
    dns_server = LocalDns(base / "dns", MX).start()
    peer = RecordingPeer().start()
    stack = Stack(work_dir, kafka, smtp_routes="", dns=dns_server.nameserver, mx_port=str(peer.port), scanners="none",
                  retry_schedule="300ms,600ms", max_queue_age="1h", rate_limit="100000/60s")
    try:
        for d in ("mailflow.test", "local.test"):  # local.test: the bounces' From domain
            out = cli(stack, "domains", "add", d, *(["--ed25519"] if d == "mailflow.test" else []))
            assert out.returncode == 0, out.stderr
            assert f"._domainkey.{d}.\t3600\tIN\tTXT\t\"v=DKIM1; k=rsa; p=" in out.stdout
        publish(dns_server, stack, "mailflow.test", "local.test")
        stack.start(["ratelimit", "validate", "store", "scan", "sentfolder", "deliver", "retry", "status"])
        yield {"dns": dns_server, "peer": peer, "stack": stack, "before_rotation": []}
    finally:
        stack.stop()
        peer.stop()
        dns_server.stop()


def dnsfunc(world: dict[str, Any]) -> Any:
    res = dns.resolver.Resolver(configure=False)
    res.nameservers, res.port = ["127.0.0.1"], world["dns"].port

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = res.resolve(name.decode().rstrip("."), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)
    return lookup


def verify_all(world: dict[str, Any], message: bytes) -> list[bytes]:
    """Every DKIM signature on ``message`` verifies; their selectors."""
    d = dkim.DKIM(message)
    n = message.split(b"\r\n\r\n", 1)[0].count(b"DKIM-Signature:")
    assert n >= 1, message[:300]
    for i in range(n):
        assert d.verify(idx=i, dnsfunc=dnsfunc(world)), (i, message[:600])
    return re.findall(rb"\bs=([\w-]+)", message.split(b"\r\n\r\n", 1)[0])


def delivered(world: dict[str, Any], doc: Any) -> bytes:
    s = world["stack"]
    wait_for(lambda: settled(s, [doc["id"]]), 90, what="delivery")
    st = s.status(doc["id"])
    assert {r["state"] for r in st["recipients"].values()} == {"delivered"}, st
    sf = next(e for e in st["timeline"] if e["state"] == "sent_folder")
    assert sf["detail"]["dkim"]["signed"] is True and sf["detail"]["dkim"]["d"] == "mailflow.test"
    got = [m for m in world["peer"].messages if doc["id"].encode() in m[2]]
    assert len(got) == 1
    return got[0][2]


def test_multipart_dot_line_and_utf8_verify_and_one_byte_breaks_it(world: dict[str, Any]) -> None:
    s = world["stack"]
    code, a, _ = s.submit({"from": "alice@mailflow.test", "to": "bob@dkim.test", "subject": "with attachment",
                           "text": "see the file", "attachments": [
                               {"filename": "data.bin", "content_type": "application/octet-stream",
                                "content_base64": base64.b64encode(bytes(range(256)) * 20).decode()}]})
    assert code == 202
    dot = (b"From: alice@mailflow.test\r\nTo: bob@dkim.test\r\nSubject: dots\r\n\r\n"
           b"first\r\n.a line that starts with a dot\r\n..two dots\r\n.\r\nlast\r\n")
    code, b, _ = s.submit(dot, ctype="message/rfc822")
    assert code == 202
    utf8 = ("From: alice@mailflow.test\r\nTo: bob@dkim.test\r\nSubject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln, ½ € — 日本語\r\n").encode()
    code, c, _ = s.submit(utf8, ctype="message/rfc822")
    assert code == 202
    for doc in (a, b, c):
        # the message-id the API gave carries the mailflow id
        raw = delivered(world, doc)
        sels = verify_all(world, raw)
        assert len(sels) == 2  # RSA and Ed25519
        world["before_rotation"].append(raw)
    raw_b = world["before_rotation"][1]
    assert b"\r\n.a line that starts with a dot\r\n" in raw_b
    assert "Grüße aus Köln".encode() in world["before_rotation"][2]
    changed = raw_b.replace(b"first", b"firsT")
    assert not dkim.verify(changed, dnsfunc=dnsfunc(world))


def test_a_retry_after_451_sends_the_same_signature(world: dict[str, Any]) -> None:
    s, peer = world["stack"], world["peer"]
    peer.fail_first = peer.transactions + 1  # the next DATA gets 451
    code, doc, _ = s.submit({"from": "alice@mailflow.test", "to": "carol@dkim.test", "subject": "retried",
                             "text": "second time lucky"})
    assert code == 202
    raw = delivered(world, doc)
    attempts = [d for d in peer.data if doc["id"].encode() in d]
    assert len(attempts) == 2 and attempts[0] == attempts[1] == raw
    assert any(e["state"] == "deferred" for e in s.status(doc["id"])["timeline"])
    verify_all(world, raw)


def test_one_click_unsubscribe_headers_are_under_the_signature(world: dict[str, Any]) -> None:
    s = world["stack"]
    code, doc, _ = s.submit({"from": "alice@mailflow.test", "to": "dave@dkim.test", "subject": "news",
                             "text": "monthly", "unsubscribe": True})
    assert code == 202
    raw = delivered(world, doc)
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nList-Unsubscribe: <" in head and b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in head
    verify_all(world, raw)
    h_tags = re.findall(rb"\bh=([^;]+);", re.sub(rb"\s+", b"", head))
    assert h_tags and all(b"list-unsubscribe:list-unsubscribe-post" in tag for tag in h_tags)
    # The link is signed: another token under this signature fails.
    forged = re.sub(rb"(/v1/unsubscribe/)([^>]+)>", rb"\1AAAA\2>", raw, count=1)
    assert forged != raw and not dkim.verify(forged, dnsfunc=dnsfunc(world))


def test_bounces_are_signed(world: dict[str, Any]) -> None:
    s, peer = world["stack"], world["peer"]
    code, doc, _ = s.submit({"from": "carol@dkim.test", "to": "reject@dkim.test", "subject": "to bounce",
                             "text": "nobody"})
    assert code == 202
    wait_for(lambda: [m for m in peer.messages if m[0] in ("", "<>") and doc["id"].encode() in m[2]], 90,
             what="the bounce")
    [bounce] = [m for m in peer.messages if m[0] in ("", "<>") and doc["id"].encode() in m[2]]
    assert b"d=local.test" in bounce[2]
    verify_all(world, bounce[2])


def test_check_says_what_is_missing(world: dict[str, Any]) -> None:
    s = world["stack"]
    out = cli(s, "domains", "check", "mailflow.test")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok") >= 4 and "PROBLEM" not in out.stdout
    assert cli(s, "domains", "add", "unpublished.test").returncode == 0
    out = cli(s, "domains", "check", "unpublished.test", "--json")
    assert out.returncode == 1
    res = orjson.loads(out.stdout)
    assert not res["ok"] and all(not f["ok"] and f["text"].startswith("missing") for f in res["findings"])
    assert [f["what"].split()[0] for f in res["findings"]] == ["SPF", "DKIM", "DMARC"]


def selectors(stack: Stack, domain: str) -> dict[str, str]:
    """selector -> state, as `mailflow domains list --json` says."""
    [rec] = [r for r in orjson.loads(cli(stack, "domains", "list", "--json").stdout) if r["domain"] == domain]
    return {x["selector"]: x["state"] for x in rec["selectors"]}


def test_rotation_both_selectors_verify(world: dict[str, Any]) -> None:
    s = world["stack"]
    old = set(selectors(s, "mailflow.test"))
    assert len(old) == 2
    out = cli(s, "domains", "rotate", "mailflow.test")
    assert out.returncode == 0, out.stderr
    publish(world["dns"], s, "mailflow.test", "local.test")
    code, doc, _ = s.submit({"from": "alice@mailflow.test", "to": "dave@dkim.test", "subject": "rotated",
                             "text": "new key"})
    assert code == 202
    sels = verify_all(world, delivered(world, doc))
    assert {x.decode() for x in sels}.isdisjoint(old)  # signed with the new selectors
    for raw in world["before_rotation"]:  # mail signed before still verifies
        assert {x.decode() for x in verify_all(world, raw)} <= old
    out = cli(s, "domains", "rotate", "mailflow.test")  # the records resolve: make it final
    assert out.returncode == 0 and "switched to" in out.stderr, out.stderr
    states = selectors(s, "mailflow.test")
    assert {states[o] for o in old} == {"retired"} and list(states.values()).count("active") == 2


def test_domains_api(world: dict[str, Any]) -> None:
    s = world["stack"]
    code, body, _ = http("GET", f"{s.api}/v1/domains")
    assert code == 200 and "mailflow.test" in [d["domain"] for d in body["domains"]]
    code, body, _ = http("GET", f"{s.api}/v1/domains/mailflow.test")
    assert code == 200 and body["dns"][0]["type"] == "TXT" and body["selectors"]
    code, body, _ = http("POST", f"{s.api}/v1/domains", {"domain": "api.test", "ed25519": True})
    assert code == 201 and len(body["selectors"]) == 2
    assert http("POST", f"{s.api}/v1/domains", {"domain": "api.test"})[0] == 409
    code, body, _ = http("POST", f"{s.api}/v1/domains", {"domain": "not a domain"})
    assert code == 400 and body["error"]["fields"]["domain"]
    assert http("GET", f"{s.api}/v1/domains/nowhere.test")[0] == 404
    from mailflow.api.auth import create_key

    key, _ = create_key(s.settings(), ["mailflow.test"], name="not admin")
    assert http("GET", f"{s.api}/v1/domains", auth=key)[0] == 403
    assert http("GET", f"{s.api}/v1/domains", auth=None)[0] == 401


def test_required_mode_refuses_a_domain_without_key(world: dict[str, Any]) -> None:
    s = world["stack"]
    port = free_port()
    env = {**s.env, "MAILFLOW_DKIM": "required", "MAILFLOW_API_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "mailflow.ops.cli", "api"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return http("GET", f"{base}/healthz")[0] == 200
            except OSError:
                return False
        wait_for(up, 60, what="the second API")
        code, body, _ = http("POST", f"{base}/v1/messages", {"from": "x@nokey.test", "to": "y@dkim.test",
                                                             "text": "unsigned"}, auth=s.key)
        assert code == 422 and body["error"]["code"] == "dkim_key_missing", body
        assert "nokey.test" in body["error"]["message"]
        code, body, _ = http("POST", f"{base}/v1/messages", {"from": "alice@mailflow.test", "to": "y@dkim.test",
                                                             "text": "signed"}, auth=s.key)
        assert code == 202, body
    finally:
        proc.terminate()
        proc.wait(20)


def test_no_private_key_in_clear_anywhere(world: dict[str, Any]) -> None:
    s = world["stack"]
    settings = s.settings()
    key = operator_key(settings)
    secrets_: list[bytes] = []
    for rec in dom.read_all(settings).values():
        for sel in rec["selectors"]:
            private = dom.private_key(key, rec, sel)
            if private.startswith(b"-----"):
                body = b"".join(private.split(b"\n")[1:-2])
                secrets_ += [body[:48], base64.b64decode(body)[:48]]
            else:
                secrets_ += [private[:40], base64.b64decode(private)]
    assert len(secrets_) >= 10
    haystacks: list[tuple[str, bytes]] = []
    from streams.topics import topic_specs

    for spec in topic_specs(settings):
        for k, v in s.read_topic(spec.name, timeout=3):
            haystacks.append((spec.name, (k or b"") + b"|" + (v or b"")))
    haystacks += [(p.name, p.read_bytes()) for p in (s.data_dir / "logs").iterdir()]
    haystacks.append(("api", http("GET", f"{s.api}/v1/domains")[1].__repr__().encode()))
    haystacks.append(("api", orjson.dumps(http("GET", f"{s.api}/v1/domains")[1])))
    for args in (("list", "--json"), ("dns", "mailflow.test"), ("list",)):
        out = cli(s, "domains", *args)
        haystacks.append(("cli", (out.stdout + out.stderr).encode()))
    assert any(name == "domains" for name, _ in haystacks)
    for name, data in haystacks:
        for secret in secrets_:
            assert secret not in data, f"a private key in clear in {name}"
