"""MTA-STS (RFC 8461): which MX hosts a recipient domain allows, and that TLS to them verifies.

For a recipient domain with a ``_mta-sts.<domain>`` TXT record (``v=STSv1; id=...``)
the policy is fetched from ``https://mta-sts.<domain>/.well-known/mta-sts.txt``
(certificate verified for that name, system CAs plus ``MAILFLOW_TLS_CA_FILE``, no
redirects) and cached per process by its ``id`` and ``max_age``: the TXT record is
looked up again on each use (cached by DNS like any answer), the policy fetched
again only when its id changed or it expired. A domain whose TXT record went away
keeps its unexpired cached policy (RFC 8461 §5.1); a failed fetch keeps the cached
one too, and without one the domain is treated as having no policy.

Modes: ``enforce``: deliver only to MX hosts the policy's ``mx`` patterns name
(``*.example.com`` matches one label), over TLS verified for the MX name, else the
attempt is temporary with the reason; ``testing``: deliver as usual, log (and put
in the status) what enforce would have refused; ``none``: as no policy.

``MAILFLOW_MTA_STS`` (``on`` | ``off``, default on) turns it off;
``MAILFLOW_MTA_STS_PORT`` (default 443) is the policy host's HTTPS port: tests
point it at a local HTTPS server, production leaves it alone.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from mailflow.mta.mx import DnsError, Resolver

log = logging.getLogger("mailflow.mtasts")

MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: at most a year
TXT_CACHE = 300.0  # seconds, at most, between looks at a domain's _mta-sts record
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 §3.3 recommends a limit of 64 KiB
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


class PolicyError(ValueError):
    """A policy file or TXT record that does not follow RFC 8461."""


@dataclass(frozen=True)
class Policy:
    id: str
    mode: str  # enforce | testing | none
    mx: tuple[str, ...]
    max_age: int
    fetched_at: float = 0.0

    def expired(self, now: float) -> bool:
        return now >= self.fetched_at + self.max_age


def parse_txt(records: list[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT strings, None when there is no (single, valid) record."""
    found = [r for r in records if r.strip().startswith("v=STSv1")]
    if len(found) != 1:
        return None  # none, or several: RFC 8461 §3.1 says treat as no policy
    tags = {}
    for part in found[0].split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            tags[k.strip()] = v.strip()
    pid = tags.get("id", "")
    return pid if _ID.match(pid) else None


def parse_policy(text: str, policy_id: str = "", now: float = 0.0) -> Policy:
    """The policy file (RFC 8461 §3.2: ``key: value`` lines, CRLF or LF)."""
    fields: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        k, sep, v = line.partition(":")
        if not sep:
            raise PolicyError(f"not a policy line: {line[:60]!r}")
        fields.setdefault(k.strip().lower(), []).append(v.strip())
    if fields.get("version") != ["STSv1"]:
        raise PolicyError("version is not STSv1")
    mode = (fields.get("mode") or [""])[0]
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"unknown mode {mode!r}")
    age = (fields.get("max_age") or [""])[0]
    if not age.isdigit():
        raise PolicyError(f"max_age is not a number: {age!r}")
    mx = tuple(m.lower().rstrip(".") for m in fields.get("mx", []))
    if mode != "none" and not mx:
        raise PolicyError("no mx lines")
    return Policy(policy_id, mode, mx, min(int(age), MAX_AGE_LIMIT), now)


def mx_matches(host: str, patterns: tuple[str, ...]) -> bool:
    """Whether the MX host name matches one of the policy's ``mx`` patterns (RFC 8461 §4.1)."""
    name = host.lower().rstrip(".")
    for p in patterns:
        if p.startswith("*."):
            head, _, rest = name.partition(".")
            if head and rest == p[2:]:
                return True
        elif name == p:
            return True
    return False


class _Resolve(AbstractResolver):
    """aiohttp's host lookups through mailflow's resolver (``MAILFLOW_DNS``)."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        try:
            addrs = await self.resolver.addresses(host)
        except DnsError as exc:
            raise OSError(f"{host}: {exc.reason}") from exc
        return [ResolveResult(hostname=host, host=a, port=port,
                              family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST) for a in addrs]

    async def close(self) -> None:
        return None


class MtaSts:
    """Policies of recipient domains, fetched and cached; one per delivery process."""

    def __init__(self, resolver: Resolver, *, ca_file: str = "", port: int = 443,
                 timeout: float = 10.0, clock: Any = time.time) -> None:
        self.resolver, self.port, self.timeout, self.clock = resolver, port, timeout, clock
        self.ctx = ssl.create_default_context()
        if ca_file:
            self.ctx.load_verify_locations(cafile=ca_file)
        self.cache: dict[str, Policy] = {}
        self._txt_cache: dict[str, tuple[str | None, float]] = {}  # domain -> (id, until)
        self._locks: dict[str, asyncio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None

    async def _txt_id(self, domain: str) -> str | None:
        """The ``_mta-sts`` record's id, cached for its TTL (at most TXT_CACHE seconds):
        a burst of mail to one domain costs one query, as MX lookups do."""
        import dns.resolver

        now = time.monotonic()
        hit = self._txt_cache.get(domain)
        if hit is not None and hit[1] > now:
            return hit[0]
        ttl = TXT_CACHE
        try:
            answer = await self.resolver.dns_resolver.resolve(f"_mta-sts.{domain}", "TXT", search=False)
            pid = parse_txt([b"".join(r.strings).decode("ascii", "replace") for r in answer])
            if answer.rrset is not None:
                ttl = min(ttl, max(1.0, float(answer.rrset.ttl)))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            pid = None
        self._txt_cache[domain] = (pid, now + ttl)
        return pid

    async def _fetch(self, domain: str, policy_id: str) -> Policy:
        if self._session is None:
            conn = aiohttp.TCPConnector(resolver=_Resolve(self.resolver), ssl=self.ctx)
            self._session = aiohttp.ClientSession(connector=conn,
                                                  timeout=aiohttp.ClientTimeout(total=self.timeout))
        port = "" if self.port == 443 else f":{self.port}"
        url = f"https://mta-sts.{domain}{port}/.well-known/mta-sts.txt"
        async with self._session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise PolicyError(f"{url} answered {resp.status}")
            if resp.content_type != "text/plain":
                raise PolicyError(f"{url} is {resp.content_type}, not text/plain")
            body = await resp.content.read(MAX_POLICY_BYTES + 1)
        if len(body) > MAX_POLICY_BYTES:
            raise PolicyError(f"{url} is larger than {MAX_POLICY_BYTES} bytes")
        return parse_policy(body.decode("utf-8", "replace"), policy_id, self.clock())

    async def policy(self, domain: str) -> Policy | None:
        """The domain's policy in force, None when it has none (or mode none)."""
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:  # one fetch per domain however many deliveries ask
            pol = await self._policy(domain)
        return pol if pol is not None and pol.mode != "none" else None

    async def _policy(self, domain: str) -> Policy | None:
        now = self.clock()
        cached = self.cache.get(domain)
        if cached is not None and cached.expired(now):
            del self.cache[domain]
            cached = None
        try:
            pid = await self._txt_id(domain)
        except Exception as exc:  # DNS trouble: the cached policy, if any, still holds
            log.warning("mta-sts: TXT lookup for %s failed (%r)", domain, exc)
            return cached
        if pid is None or (cached is not None and cached.id == pid):
            return cached
        try:
            pol = await self._fetch(domain, pid)
        except Exception as exc:  # RFC 8461 §5.1: keep using the cached policy
            log.warning("mta-sts: policy of %s not fetched: %s", domain, exc)
            return cached
        log.info("mta-sts: %s policy %s mode %s mx %s max_age %d", domain, pid, pol.mode,
                 ",".join(pol.mx), pol.max_age)
        self.cache[domain] = pol
        return pol

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@dataclass(frozen=True)
class Plan:
    """Where and how to deliver under a policy: the MX hosts to try, the TLS policy
    for them (None: the pool's), the MTA-STS mode to report, and why nothing may
    be tried (enforce with no MX host the policy names)."""

    hosts: list[Any]
    tls: str | None = None
    mode: str | None = None
    refused: str | None = None


def plan(domain: str, policy: Policy | None, dests: list[Any]) -> Plan:
    """The pure decision: ``dests`` are mx.Destination (``.host``) in order."""
    if policy is None:
        return Plan(dests)
    allowed = [d for d in dests if mx_matches(d.host, policy.mx)]
    if policy.mode == "enforce":
        if not allowed:
            return Plan([], "required", "enforce",
                        f"4.7.5 MTA-STS policy of {domain} (enforce) names none of its MX hosts "
                        f"({', '.join(d.host for d in dests)})")
        return Plan(allowed, "required", "enforce")
    if len(allowed) < len(dests):
        log.warning("mta-sts testing: %s: enforce would skip MX %s (policy mx %s)", domain,
                    ",".join(d.host for d in dests if d not in allowed), ",".join(policy.mx))
    return Plan(dests, None, policy.mode)
