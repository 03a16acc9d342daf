"""mailflow.mta.mx: the pure helpers, and Resolver against the real dnsmasq on 127.0.0.1:5353.

The DNS tests use the test zone in ``devtools.services.DEFAULT_DNS_CONF`` (local
TTL 1 s).  The session fixture starts the local services like
test_services.py does, or reuses ones that already answer.  Timeouts and
SERVFAIL come from sockets on loopback that never answer / answer SERVFAIL.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import pytest

from devtools.services import (
    DEFAULT_DNS_CONF,
    DNS_PORT,
    check_installed,
    dns_query,
    ensure_running,
)
from mailflow.config import parse_routes
from mailflow.mta.mx import (
    Destination,
    PermanentDnsError,
    Resolver,
    TemporaryDnsError,
    is_null_mx,
    order_mx,
    parse_nameservers,
    route_for,
    to_ascii,
)

HOST = "127.0.0.1"
NAMESERVER = f"{HOST}:{DNS_PORT}"


# --------------------------------------------------------------------------- pure helpers


def test_order_mx_by_preference_and_input_untouched() -> None:
    records = [(20, "b.test"), (10, "a.test"), (30, "c.test"), (0, "z.test")]
    before = list(records)
    for seed in range(5):
        assert order_mx(records, random.Random(seed)) == [
            (0, "z.test"),
            (10, "a.test"),
            (20, "b.test"),
            (30, "c.test"),
        ]
    assert records == before
    assert order_mx([]) == []


def test_order_mx_shuffles_ties_only() -> None:
    records = [(10, "x.test"), (10, "y.test"), (5, "first.test"), (20, "last.test")]
    orders = set()
    for seed in range(40):
        ordered = order_mx(records, random.Random(seed))
        assert ordered[0] == (5, "first.test") and ordered[-1] == (20, "last.test")
        orders.add(tuple(host for _, host in ordered[1:3]))
    assert orders == {("x.test", "y.test"), ("y.test", "x.test")}


def test_order_mx_same_seed_same_order() -> None:
    records = [(10, f"mx{i}.test") for i in range(8)]
    assert order_mx(records, random.Random(7)) == order_mx(records, random.Random(7))


@pytest.mark.parametrize(
    ("records", "null"),
    [
        ([(0, ".")], True),
        ([(10, ".")], True),  # RFC 7505 says preference 0, but a root host is null anyway
        ([(0, "."), (10, "mx.test.")], True),
        ([(0, "")], True),
        ([(10, "mx.test.")], False),
        ([(0, "mx.test")], False),
        ([], False),
    ],
)
def test_is_null_mx(records: list[tuple[int, str]], null: bool) -> None:
    assert is_null_mx(records) is null


def test_route_for() -> None:
    routes = parse_routes("Example.COM=127.0.0.1:2525,xn--bcher-kva.test=[::1]:26")
    assert route_for("example.com", routes) == Destination("127.0.0.1", 2525, 0)
    assert route_for("EXAMPLE.com.", routes) == Destination("127.0.0.1", 2525, 0)
    assert route_for("bücher.test", routes) == Destination("::1", 26, 0)
    assert route_for("other.test", routes) is None
    assert route_for("sub.example.com", routes) is None  # exact match only
    routes_all = {**routes, "*": ("smarthost.test", 587)}
    assert route_for("other.test", routes_all) == Destination("smarthost.test", 587, 0)
    assert route_for("example.com", routes_all) == Destination("127.0.0.1", 2525, 0)
    assert route_for("example.com", {}) is None
    assert route_for("bücher.test", {"bücher.test": ("h", 25)}) == Destination("h", 25, 0)


def test_parse_nameservers() -> None:
    assert parse_nameservers("") == []
    assert parse_nameservers("127.0.0.1:5353") == [("127.0.0.1", 5353)]
    assert parse_nameservers(" 192.0.2.53 , [::1]:5353,2001:db8::1") == [
        ("192.0.2.53", 53),
        ("::1", 5353),
        ("2001:db8::1", 53),
    ]
    for bad in ("dns.example:53", "127.0.0.1:x", "127.0.0.1:0", "[::1]x"):
        with pytest.raises(ValueError):
            parse_nameservers(bad)


def test_to_ascii() -> None:
    assert to_ascii("Bücher.TEST.") == "xn--bcher-kva.test"
    assert to_ascii("Example.Test") == "example.test"
    for bad in ("", ".", "a..b", "-bad-.test", "a b.test", "x" * 64 + ".test"):
        with pytest.raises(PermanentDnsError, match="5.1.2"):
            to_ascii(bad)


def test_resolver_reads_resolv_conf_when_setting_empty(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search corp.test\nnameserver 192.0.2.53\n")
    r = Resolver("", resolv_conf=str(conf), timeout=1, lifetime=3)
    assert r.dns_resolver.nameservers == ["192.0.2.53"]
    assert r.dns_resolver.search == []  # domains are always absolute
    assert (r.dns_resolver.timeout, r.dns_resolver.lifetime) == (1, 3)
    r = Resolver("127.0.0.1:5353,[::1]:5354")
    assert [(ns.address, ns.port) for ns in r.dns_resolver.nameservers] == [
        ("127.0.0.1", 5353),
        ("::1", 5354),
    ]
    assert r.dns_resolver.lifetime == 5.0


async def test_address_literal_needs_no_dns() -> None:
    r = Resolver("127.0.0.1:9")  # nothing listens there: any query would fail
    assert await r.destinations("[192.0.2.1]", 2525) == [Destination("192.0.2.1", 2525, 0)]
    assert await r.destinations("[IPv6:2001:db8::1]") == [Destination("2001:db8::1", 25, 0)]
    assert await r.addresses("192.0.2.7") == ["192.0.2.7"]


# --------------------------------------------------------------------------- real dnsmasq

MISSING = check_installed()
needs_services = pytest.mark.skipif(
    bool(MISSING) and not os.environ.get("CI"),
    reason=f"local services not installed: {', '.join(MISSING)}",
)


@pytest.fixture(scope="session")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The nameserver setting for the dnsmasq test zone on 127.0.0.1:5353."""
    assert not MISSING, f"missing executables: {MISSING}"
    group = ensure_running(
        tmp_path_factory.mktemp("services"),
        dns_conf=DEFAULT_DNS_CONF,
        log=lambda m: print(m, file=sys.stderr),
    )
    try:
        # A dnsmasq started earlier by another session keeps its old records.
        rcode, _ = dns_query("equal.test", "MX", HOST, DNS_PORT)
        if rcode != "NOERROR":
            pytest.fail(
                "the dnsmasq on 127.0.0.1:5353 predates the current DEFAULT_DNS_CONF "
                "(equal.test is missing); stop it and run again"
            )
        yield NAMESERVER
    finally:
        if group is not None:
            group.stop()


class Clock:
    """A monotonic clock the test moves by hand, for cache expiry."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def count_queries(resolver: Resolver) -> list[tuple[str, str]]:
    """Record every query the resolver sends (wraps dnspython's ``resolve``)."""
    calls: list[tuple[str, str]] = []
    real = resolver.dns_resolver.resolve

    async def resolve(qname, rdtype="A", *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append((str(qname).rstrip("."), str(rdtype)))
        return await real(qname, rdtype, *args, **kwargs)

    resolver.dns_resolver.resolve = resolve  # type: ignore[method-assign]
    return calls


@needs_services
async def test_mx_ordered_by_preference(dns_server: str) -> None:
    r = Resolver(dns_server)
    assert await r.destinations("example.test") == [
        Destination("mx1.example.test", 25, 10),
        Destination("mx2.example.test", 25, 20),
    ]
    assert await r.destinations("EXAMPLE.test.", port=2525) == [
        Destination("mx1.example.test", 2525, 10),
        Destination("mx2.example.test", 2525, 20),
    ]
    assert await r.addresses("mx2.example.test") == ["127.0.0.2"]


@needs_services
async def test_mx_equal_preference_both_orders(dns_server: str) -> None:
    r = Resolver(dns_server, rng=random.Random(1))
    seen = set()
    for _ in range(30):  # answers come from the cache; the order is drawn on every call
        dests = await r.destinations("equal.test")
        assert {d.preference for d in dests} == {10}
        seen.add(tuple(d.host for d in dests))
    assert seen == {("mxa.equal.test", "mxb.equal.test"), ("mxb.equal.test", "mxa.equal.test")}


@needs_services
async def test_implicit_mx_from_a_record(dns_server: str) -> None:
    r = Resolver(dns_server)
    calls = count_queries(r)
    assert await r.destinations("a.mailflow.test") == [Destination("a.mailflow.test", 25, 0)]
    assert sorted(calls) == [
        ("a.mailflow.test", "A"),
        ("a.mailflow.test", "AAAA"),
        ("a.mailflow.test", "MX"),
    ]
    assert await r.addresses("a.mailflow.test") == ["192.0.2.10"]
    assert len(calls) == 3  # the implicit MX lookup already filled the address cache


@needs_services
async def test_implicit_mx_from_aaaa_only(dns_server: str) -> None:
    r = Resolver(dns_server)
    assert await r.destinations("v6.mailflow.test") == [Destination("v6.mailflow.test", 25, 0)]
    assert await r.addresses("v6.mailflow.test") == ["::1"]


@needs_services
async def test_idna_domain_is_looked_up_in_a_labels(dns_server: str) -> None:
    r = Resolver(dns_server)
    calls = count_queries(r)
    assert await r.destinations("Bücher.test") == [Destination("mx.xn--bcher-kva.test", 25, 10)]
    assert calls == [("xn--bcher-kva.test", "MX")]


@needs_services
async def test_null_mx_is_permanent(dns_server: str) -> None:
    r = Resolver(dns_server)
    with pytest.raises(PermanentDnsError) as info:
        await r.destinations("nullmx.test")  # it has an A record too: no implicit MX
    assert info.value.reason == "5.1.10 null MX"
    assert info.value.status == "5.1.10" and info.value.domain == "nullmx.test"


@needs_services
async def test_unknown_domain_is_permanent(dns_server: str) -> None:
    r = Resolver(dns_server)
    with pytest.raises(PermanentDnsError) as info:
        await r.destinations("no-such-domain.test")
    assert info.value.reason == "5.1.2 domain does not exist"
    with pytest.raises(PermanentDnsError) as info:
        await r.addresses("no-such-host.example.test")
    assert info.value.reason == "5.4.4 host not found"
    with pytest.raises(PermanentDnsError) as info:
        await r.addresses("example.test")  # exists, MX only
    assert info.value.reason == "5.4.4 host has no address records"


@needs_services
async def test_no_mx_and_no_address_is_permanent(dns_server: str) -> None:
    r = Resolver(dns_server)
    with pytest.raises(PermanentDnsError) as info:
        await r.destinations("nomail.test")
    assert info.value.reason == "5.1.2 no MX or address records"


@needs_services
async def test_cache_answers_without_a_second_query(dns_server: str) -> None:
    clock = Clock()
    r = Resolver(dns_server, clock=clock)
    calls = count_queries(r)
    first = await r.destinations("example.test")
    assert await r.destinations("example.test") == first
    assert calls == [("example.test", "MX")]
    clock.now += 2  # past the TTL (dnsmasq local-ttl=1)
    assert await r.destinations("example.test") == first
    assert calls == [("example.test", "MX")] * 2


@needs_services
async def test_concurrent_lookups_share_one_query(dns_server: str) -> None:
    r = Resolver(dns_server)
    calls = count_queries(r)
    results = await asyncio.gather(*(r.destinations("mailflow.test") for _ in range(20)))
    assert all(res == [Destination("mx.mailflow.test", 25, 10)] for res in results)
    assert calls == [("mailflow.test", "MX")]


@needs_services
async def test_negative_answers_cached_for_60s(dns_server: str) -> None:
    clock = Clock()
    r = Resolver(dns_server, clock=clock)
    calls = count_queries(r)
    for _ in range(3):
        with pytest.raises(PermanentDnsError, match="does not exist"):
            await r.destinations("no-such-domain.test")
    assert len(calls) == 1
    clock.now += 59  # dnsmasq sends no SOA: the 60 s default applies
    with pytest.raises(PermanentDnsError):
        await r.destinations("no-such-domain.test")
    assert len(calls) == 1
    clock.now += 2
    with pytest.raises(PermanentDnsError):
        await r.destinations("no-such-domain.test")
    assert len(calls) == 2


@needs_services
async def test_cache_is_bounded_lru(dns_server: str) -> None:
    r = Resolver(dns_server, cache_size=2)
    calls = count_queries(r)
    await r.destinations("example.test")
    await r.destinations("mailflow.test")
    await r.destinations("example.test")  # hit: example.test becomes the newest
    await r.destinations("equal.test")  # evicts mailflow.test
    assert len(calls) == 3
    await r.destinations("example.test")
    assert len(calls) == 3
    await r.destinations("mailflow.test")
    assert len(calls) == 4


# --------------------------------------------------------------------------- temporary failures


@pytest.fixture
def silent_udp() -> Iterator[int]:
    """A UDP port on loopback that takes queries and never answers (a DNS timeout)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        yield s.getsockname()[1]


@pytest.fixture
def servfail_udp() -> Iterator[tuple[int, list[bytes]]]:
    """A UDP nameserver on loopback that answers every query SERVFAIL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.settimeout(0.1)
    seen: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            seen.append(data)
            reply = dns.message.make_response(dns.message.from_wire(data))
            reply.set_rcode(dns.rcode.SERVFAIL)
            sock.sendto(reply.to_wire(), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], seen
    finally:
        stop.set()
        thread.join(5)
        sock.close()


async def test_timeout_is_temporary_and_not_cached(silent_udp: int) -> None:
    r = Resolver(f"{HOST}:{silent_udp}", timeout=0.2, lifetime=0.5)
    calls = count_queries(r)
    for _ in range(2):
        t0 = time.monotonic()
        with pytest.raises(TemporaryDnsError) as info:
            await r.destinations("example.test")
        assert time.monotonic() - t0 < 3
        assert info.value.reason == "4.4.3 DNS timeout" and info.value.status == "4.4.3"
    assert len(calls) == 2  # temporary failures are asked again


async def test_closed_port_is_temporary() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]  # closed again when the block ends
    r = Resolver(f"{HOST}:{port}", timeout=0.2, lifetime=0.5)
    t0 = time.monotonic()
    with pytest.raises(TemporaryDnsError, match="4.4.3"):
        await r.destinations("example.test")
    assert time.monotonic() - t0 < 3


async def test_servfail_is_temporary_and_not_cached(
    servfail_udp: tuple[int, list[bytes]],
) -> None:
    port, seen = servfail_udp
    r = Resolver(f"{HOST}:{port}", timeout=0.5, lifetime=2)
    for _ in range(2):
        with pytest.raises(TemporaryDnsError) as info:
            await r.destinations("example.test")
        assert info.value.reason.startswith("4.4.3 DNS server failure")
    queries = [dns.message.from_wire(q) for q in seen]
    assert len(queries) == 2 and all(q.flags & dns.flags.RD for q in queries)
