"""mailflow.mta.mtasts: policy parsing and matching (pure), and fetching with the real
parts: a dnsmasq of the test's own for ``_mta-sts`` and ``mta-sts.<domain>``, an
HTTPS server (aiohttp) with a certificate from a CA made in the test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from harness import free_port
from testca import LocalDns, TestCA, txt_record

from mailflow.mta.mtasts import MtaSts, PolicyError, mx_matches, parse_policy, parse_txt, plan
from mailflow.mta.mx import Destination, Resolver

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.sts.test\r\nmx: *.backup.sts.test\r\nmax_age: 86400\r\n"


def test_parse_txt() -> None:
    assert parse_txt(["v=STSv1; id=20261201T1;"]) == "20261201T1"
    assert parse_txt(["v=spf1 -all"]) is None
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two records: none
    assert parse_txt(["v=STSv1; id=bad-id!"]) is None


def test_parse_policy() -> None:
    p = parse_policy(POLICY, "x", 100.0)
    assert (p.mode, p.mx, p.max_age, p.id) == ("enforce", ("mx1.sts.test", "*.backup.sts.test"), 86400, "x")
    assert not p.expired(100.0 + 86399) and p.expired(100.0 + 86400)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 99999999999\n").max_age == 31557600
    for bad in ("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n", "version: STSv1\nmode: on\nmx: a\nmax_age: 1",
                "version: STSv1\nmode: enforce\nmax_age: 1\n", "version: STSv1\nmode: testing\nmx: a\nmax_age: x",
                "garbage"):
        with pytest.raises(PolicyError):
            parse_policy(bad)


def test_mx_matches_one_label_wildcards() -> None:
    pats = ("mx1.sts.test", "*.backup.sts.test")
    assert mx_matches("MX1.sts.test.", pats)
    assert mx_matches("a.backup.sts.test", pats)
    assert not mx_matches("a.b.backup.sts.test", pats)  # one label only
    assert not mx_matches("backup.sts.test", pats)
    assert not mx_matches("mx2.sts.test", pats)


def test_plan() -> None:
    dests = [Destination("mx0.sts.test", 25, 5), Destination("mx1.sts.test", 25, 10)]
    enforce = parse_policy(POLICY)
    p = plan("sts.test", enforce, dests)
    assert [d.host for d in p.hosts] == ["mx1.sts.test"] and p.tls == "required" and p.mode == "enforce"
    p = plan("sts.test", enforce, dests[:1])
    assert not p.hosts and "names none of its MX hosts (mx0.sts.test)" in p.refused
    testing = parse_policy(POLICY.replace("enforce", "testing"))
    p = plan("sts.test", testing, dests)
    assert p.hosts == dests and p.tls is None and p.mode == "testing"
    assert plan("sts.test", None, dests) == plan("x", None, dests) and plan("x", None, dests).mode is None


@pytest.fixture()
async def sts_world(tmp_path: Path) -> AsyncIterator[tuple[MtaSts, dict]]:
    ca = TestCA(tmp_path / "ca")
    served = {"body": POLICY, "hits": 0}

    async def policy_file(_req: web.Request) -> web.Response:
        served["hits"] += 1
        return web.Response(text=served["body"], content_type="text/plain")

    app = web.Application()
    app.router.add_get("/.well-known/mta-sts.txt", policy_file)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ca.server_context(["mta-sts.sts.test"]))
    await site.start()
    records = "\n".join(["host-record=mta-sts.sts.test,127.0.0.1", "host-record=mta-sts.wrong.test,127.0.0.1",
                         txt_record("_mta-sts.sts.test", "v=STSv1; id=one;"),
                         txt_record("_mta-sts.wrong.test", "v=STSv1; id=one;")])
    dns_server = LocalDns(tmp_path / "dns", records).start()
    sts = MtaSts(Resolver(dns_server.nameserver), ca_file=str(ca.ca_file), port=port)
    try:
        yield sts, served
    finally:
        await sts.close()
        await runner.cleanup()
        dns_server.stop()


async def test_fetch_cache_by_id_and_verified_https(sts_world: tuple[MtaSts, dict]) -> None:
    sts, served = sts_world
    p = await sts.policy("sts.test")
    assert p is not None and p.mode == "enforce" and p.id == "one" and served["hits"] == 1
    assert await sts.policy("sts.test") == p and served["hits"] == 1  # same id: from the cache
    # the certificate names mta-sts.sts.test only: another domain's policy host does not verify
    assert await sts.policy("wrong.test") is None
    assert await sts.policy("none.test") is None  # no TXT record: no policy
    sts._txt_cache["sts.test"] = ("two", float("inf"))  # the id changed: fetched again
    served["body"] = POLICY.replace("enforce", "testing")
    p2 = await sts.policy("sts.test")
    assert p2 is not None and p2.mode == "testing" and p2.id == "two" and served["hits"] == 2
    served["body"] = "broken"
    sts._txt_cache["sts.test"] = ("three", float("inf"))
    assert await sts.policy("sts.test") == p2  # a failed fetch keeps the cached policy
