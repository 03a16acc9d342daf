"""Where mail for a recipient domain goes (RFC 5321 §5.1).

An ``SMTP_ROUTES`` entry wins (``route_for``); otherwise the domain's MX records
in preference order, equal preferences shuffled so load spreads; without MX
records the domain's own A/AAAA (the implicit MX, preference 0).  A null MX
(RFC 7505) or a domain that does not exist is permanent (bounce); timeouts and
server failures are temporary (retry later).

Answers are cached per process for their TTL, permanent failures for the
negative TTL (RFC 2308), so a burst of mail to one domain costs one query.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver

__all__ = [
    "DnsError",
    "Destination",
    "PermanentDnsError",
    "Resolver",
    "TemporaryDnsError",
    "is_null_mx",
    "order_mx",
    "parse_nameservers",
    "route_for",
    "to_ascii",
]

MIN_TTL = 1.0
MAX_TTL = 3600.0
NEGATIVE_TTL = 60.0  # permanent failures when the answer carries no SOA
DEFAULT_CACHE_SIZE = 10_000
# a host name label after IDNA: letters, digits, hyphens inside (underscore tolerated)
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


class DnsError(Exception):
    """A failed lookup; ``reason`` starts with an RFC 3463 status and fits in a bounce."""

    def __init__(self, reason: str, domain: str = "") -> None:
        super().__init__(f"{domain}: {reason}" if domain else reason)
        self.reason = reason
        self.domain = domain

    @property
    def status(self) -> str:
        """The enhanced status code at the start of ``reason``, e.g. ``"5.1.10"``."""
        return self.reason.split(" ", 1)[0]


class PermanentDnsError(DnsError):
    """The domain has no mail destination and never will without a DNS change: bounce."""


class TemporaryDnsError(DnsError):
    """DNS did not give an answer this time (timeout, SERVFAIL): try again later."""


@dataclass(frozen=True)
class Destination:
    host: str  # a host name (no trailing dot), or an IP address for literals/routes
    port: int
    preference: int


# --------------------------------------------------------------------------- pure helpers


def order_mx(
    records: list[tuple[int, str]], rng: random.Random | None = None
) -> list[tuple[int, str]]:
    """MX records by preference, lowest first; equal preferences in random order.

    RFC 5321 §5.1 asks senders to randomise among equal preferences so that
    every one of them gets a share of the mail.  The input is not modified."""
    draw = (rng or random).random
    keyed = [(pref, draw(), (pref, host)) for pref, host in records]
    keyed.sort(key=lambda k: (k[0], k[1]))
    return [rec for _, _, rec in keyed]


def is_null_mx(records: Sequence[tuple[int, str]]) -> bool:
    """True for an RFC 7505 null MX ("0 ."): the domain accepts no mail.

    Any record whose host is the root is taken as null MX, as RFC 7505 §3
    forbids mixing it with real MX records and a root host is unusable anyway."""
    return any(host.strip() in (".", "") for _, host in records)


@functools.lru_cache(maxsize=16384)
def to_ascii(domain: str) -> str:
    """The domain in lower-case A-labels without the trailing dot (IDNA 2008, UTS 46).

    Raises PermanentDnsError for names that cannot exist in DNS. Cached: every stage
    asks it of the same few domains for every message (dnspython's IDNA is a tenth
    of the sent-folder stage's CPU, docs/BENCHMARKS.md); a refusal is not cached."""
    text = domain.strip().rstrip(".")
    try:
        name = dns.name.from_text(text).to_text(omit_final_dot=True).lower() if text else ""
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise PermanentDnsError("5.1.2 invalid domain name", domain) from exc
    if not all(_LABEL.match(label) for label in name.split(".")):
        raise PermanentDnsError("5.1.2 invalid domain name", domain)
    return name


def address_literal(domain: str) -> str | None:
    """The IP address in an RFC 5321 address literal (``[192.0.2.1]``, ``[IPv6:::1]``)."""
    text = domain.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def route_for(domain: str, routes: dict[str, tuple[str, int]]) -> Destination | None:
    """The ``SMTP_ROUTES`` destination for ``domain``: exact match, else ``*``, else None.

    Routes are keyed lower-case as ``mailflow.config.parse_routes`` makes them;
    a Unicode domain also matches its A-label key and the other way round."""
    if not routes:
        return None
    name = domain.strip().rstrip(".").lower()
    keys = [name]
    try:
        keys.append(to_ascii(name))
        keys.append(dns.name.from_text(keys[-1]).to_unicode(omit_final_dot=True).lower())
    except (PermanentDnsError, dns.exception.DNSException, UnicodeError, ValueError):
        pass
    for key in [*keys, "*"]:
        if key in routes:
            host, port = routes[key]
            return Destination(host, port, 0)
    return None


def parse_nameservers(text: str) -> list[tuple[str, int]]:
    """``"127.0.0.1:5353, [::1]:53, 192.0.2.53"`` -> [(address, port), ...] (port 53 default).

    Only IP addresses: a resolver cannot look up its own nameserver's name."""
    servers: list[tuple[str, int]] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise ValueError(f"bad nameserver {item!r} (use [v6-address]:port)")
            port = rest[1:] or "53"
        elif item.count(":") == 1:
            host, _, port = item.partition(":")
        else:  # IPv4 without port, or a bare IPv6 address
            host, port = item, "53"
        try:
            addr = str(ipaddress.ip_address(host))
            number = int(port)
        except ValueError as exc:
            raise ValueError(
                f"bad nameserver {item!r} (use IP[:port], [IPv6]:port, comma-separated)"
            ) from exc
        if not 0 < number < 65536:
            raise ValueError(f"bad nameserver port in {item!r}")
        servers.append((addr, number))
    return servers


def _clamp_ttl(ttl: float) -> float:
    return min(max(float(ttl), MIN_TTL), MAX_TTL)


def _answer_ttl(answer: dns.resolver.Answer) -> float:
    """Min TTL over the answer section (CNAME chain included), clamped."""
    ttls = [rrset.ttl for rrset in answer.response.answer] or [answer.rrset.ttl if answer.rrset else 0]
    return _clamp_ttl(min(ttls))


def _negative_ttl(responses: Sequence[dns.message.Message | None]) -> float:
    """RFC 2308: min(SOA TTL, SOA minimum) from the authority section, else 60 s."""
    ttls = [
        min(rrset.ttl, rdata.minimum)
        for resp in responses
        if resp is not None
        for rrset in resp.authority
        if rrset.rdtype == dns.rdatatype.SOA
        for rdata in rrset
    ]
    return _clamp_ttl(min(ttls)) if ttls else NEGATIVE_TTL


class _Negative(Exception):
    """Internal: a permanent failure together with how long it may be cached."""

    def __init__(self, error: PermanentDnsError, ttl: float) -> None:
        super().__init__(error.reason)
        self.error = error
        self.ttl = ttl


@dataclass(frozen=True)
class _NoData:
    """Internal: NOERROR without records of the asked type (kept for its SOA)."""

    response: dns.message.Message | None


_Records = tuple[tuple[int, str], ...]
_Value = tuple[_Records, float]  # what a lookup returns: records and their TTL


# --------------------------------------------------------------------------- resolver


class Resolver:
    """Async MX resolution with an in-process LRU cache; one per worker process.

    ``nameservers`` is the ``MAILFLOW_DNS`` setting: ``"127.0.0.1:5353"`` or a
    comma-separated list; empty means the system's ``resolv_conf``.  ``timeout``
    is per query to one server, ``lifetime`` the whole budget of one lookup."""

    def __init__(
        self,
        nameservers: str = "",
        *,
        timeout: float = 2.0,
        lifetime: float = 5.0,
        cache_size: int = DEFAULT_CACHE_SIZE,
        resolv_conf: str = "/etc/resolv.conf",
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        resolver = dns.asyncresolver.Resolver(configure=False)
        servers = parse_nameservers(nameservers)
        if servers:
            resolver.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in servers]
        else:
            resolver.read_resolv_conf(resolv_conf)
        resolver.search = []  # mail domains are absolute: never append search domains
        resolver.timeout = timeout
        resolver.lifetime = lifetime
        self.dns_resolver = resolver  # the dnspython resolver (tests wrap its ``resolve``)
        self.cache_size = cache_size
        self._rng = rng
        self._clock = clock
        # key -> (expires at, records or the permanent error)
        self._cache: OrderedDict[Hashable, tuple[float, _Records | PermanentDnsError]] = (
            OrderedDict()
        )
        self._inflight: dict[Hashable, asyncio.Future[_Value]] = {}

    # ------------------------------------------------------------------ public

    async def destinations(self, domain: str, port: int = 25) -> list[Destination]:
        """The hosts to try for ``domain``, in order (MX, else implicit MX)."""
        literal = address_literal(domain)
        if literal is not None:
            return [Destination(literal, port, 0)]
        name = to_ascii(domain)
        records = await self._cached(("mx", name), lambda: self._lookup_mx(name))
        return [Destination(host, port, pref) for pref, host in order_mx(list(records), self._rng)]

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of an MX host, through the same nameservers.

        For connecting when the MX names are only known to ``MAILFLOW_DNS``
        (the system resolver would not find them).  A host without addresses
        raises PermanentDnsError: try the next MX, it does not bounce the mail."""
        literal = address_literal(host) or _ip_or_none(host)
        if literal is not None:
            return [literal]
        name = to_ascii(host)
        records = await self._cached(("addr", name), lambda: self._lookup_addresses(name))
        return [addr for _, addr in records]

    def clear_cache(self) -> None:
        self._cache.clear()

    # ------------------------------------------------------------------ cache

    async def _cached(self, key: Hashable, lookup: Callable[[], Awaitable[_Value]]) -> _Records:
        """Cache hit, else one shared lookup per key however many callers wait."""
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None:
            if entry[0] > now:
                self._cache.move_to_end(key)
                value = entry[1]
                if isinstance(value, PermanentDnsError):
                    raise type(value)(value.reason, value.domain)
                return value
            del self._cache[key]
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._fill(key, lookup))
            self._inflight[key] = fut
            fut.add_done_callback(lambda f: self._done(key, f))
        # shield: one caller being cancelled must not cancel the others' lookup
        records, _ = await asyncio.shield(fut)
        return records

    def _done(self, key: Hashable, fut: asyncio.Future[_Value]) -> None:
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        if not fut.cancelled():
            fut.exception()  # retrieved: no "never retrieved" warning if nobody waits

    async def _fill(self, key: Hashable, lookup: Callable[[], Awaitable[_Value]]) -> _Value:
        try:
            records, ttl = await lookup()
        except _Negative as neg:
            self._store(key, neg.error, neg.ttl)
            raise type(neg.error)(neg.error.reason, neg.error.domain) from None
        self._store(key, records, ttl)
        return records, ttl

    def _store(self, key: Hashable, value: _Records | PermanentDnsError, ttl: float) -> None:
        self._cache[key] = (self._clock() + ttl, value)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    # ------------------------------------------------------------------ lookups

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | _NoData:
        """One query; _NoData when the name exists but has no such records."""
        try:
            return await self.dns_resolver.resolve(
                dns.name.from_text(name), rdtype, search=False, raise_on_no_answer=True
            )
        except dns.resolver.NoAnswer as exc:
            return _NoData(exc.kwargs.get("response"))
        except dns.resolver.NXDOMAIN as exc:
            err = PermanentDnsError("5.1.2 domain does not exist", name)
            raise _Negative(err, _negative_ttl(list(exc.responses().values()))) from exc
        except dns.exception.Timeout as exc:
            raise TemporaryDnsError("4.4.3 DNS timeout", name) from exc
        except dns.resolver.NoNameservers as exc:
            raise TemporaryDnsError(
                "4.4.3 DNS server failure (no nameserver answered)", name
            ) from exc
        except (dns.exception.DNSException, OSError) as exc:
            raise TemporaryDnsError(f"4.4.3 DNS error ({type(exc).__name__})", name) from exc

    async def _lookup_mx(self, name: str) -> _Value:
        answer = await self._query(name, "MX")
        if isinstance(answer, _NoData):
            return await self._implicit_mx(name)
        records = [(int(r.preference), r.exchange.to_text()) for r in answer]
        if is_null_mx(records):
            raise _Negative(PermanentDnsError("5.1.10 null MX", name), _answer_ttl(answer))
        hosts = tuple(sorted({(pref, host.rstrip(".").lower()) for pref, host in records}))
        return hosts, _answer_ttl(answer)

    async def _implicit_mx(self, name: str) -> _Value:
        """RFC 5321 §5.1: no MX, so the domain itself at preference 0 if it has an address."""
        addrs, ttl = await self._lookup_addresses(
            name, missing="5.1.2 no MX or address records", nxdomain=""
        )
        self._store(("addr", name), addrs, ttl)  # the delivery stage will ask next
        return ((0, name),), ttl

    async def _lookup_addresses(
        self,
        name: str,
        missing: str = "5.4.4 host has no address records",
        nxdomain: str = "5.4.4 host not found",
    ) -> _Value:
        """A and AAAA together; one of them answering is enough."""
        results = await asyncio.gather(
            self._query(name, "A"), self._query(name, "AAAA"), return_exceptions=True
        )
        answers = [r for r in results if isinstance(r, dns.resolver.Answer)]
        if answers:
            addrs = tuple((i, rdata.address) for i, a in enumerate(answers) for rdata in a)
            return addrs, min(_answer_ttl(a) for a in answers)
        for r in results:  # nothing usable: a temporary failure outranks a permanent one
            if isinstance(r, TemporaryDnsError):
                raise r
        for r in results:
            if isinstance(r, _Negative) and nxdomain:
                raise _Negative(PermanentDnsError(nxdomain, name), r.ttl)
            if isinstance(r, BaseException):
                raise r
        nodata = [r.response for r in results if isinstance(r, _NoData)]
        raise _Negative(PermanentDnsError(missing, name), _negative_ttl(nodata))


def _ip_or_none(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return None
