"""Sending domains: their DKIM keys and selectors, the DNS records to publish, a DNS check.

A domain's record lives on the compacted ``domains`` topic (key: the domain), so every
replica of every stage sees the same keys after a restart::

    {"domain": "example.com", "created": 1764590000.0, "updated": ...,
     "selectors": [{"selector": "mf20261201", "algorithm": "rsa-sha256",
                    "public": "<base64 DER public key>", "private": "<sealed>",
                    "created": ..., "state": "active"}]}

``private`` is the private key sealed with AES-256-GCM under the operator key
(``mailflow.mta.keyring``); ``public_view`` drops it, and it is all an API answer, a
listing or a log line ever shows. Selectors are dated (``mf20261201``, Ed25519 ones
``mf20261201e``; a second one on a day gets ``-2``...).

States: ``active`` (signs), ``pending`` (made by ``rotate``; signs instead of the
active one of its algorithm once its TXT record resolves with its key), ``retired``
(no longer signs; keep its record published until mail signed with it has been
delivered and checked, days).
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import orjson

from mailflow.config import Settings
from mailflow.mta.keyring import operator_key, seal, unseal
from mailflow.mta.mx import parse_nameservers, to_ascii

RSA, ED25519 = "rsa-sha256", "ed25519-sha256"
TOPIC = "domains"


class DomainError(ValueError):
    """A request about domains that cannot be done; the message says why."""


# --------------------------------------------------------------------------- keys


def generate_key(algorithm: str) -> tuple[bytes, str]:
    """A new key pair: (private key as dkimpy takes it, public key as DKIM's ``p=`` value).

    RSA-2048: PKCS#1 PEM / base64 DER SubjectPublicKeyInfo. Ed25519 (RFC 8463): the
    base64 32-byte seed / base64 raw public key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if algorithm == RSA:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return private, base64.b64encode(public).decode()
    if algorithm == ED25519:
        ed = ed25519.Ed25519PrivateKey.generate()
        seed = ed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        raw = ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(seed), base64.b64encode(raw).decode()
    raise DomainError(f"unknown DKIM algorithm {algorithm!r}")


def _aad(domain: str, selector: str) -> bytes:
    return f"dkim|{domain}|{selector}".encode()


def new_selector(taken: set[str], algorithm: str, now: float) -> str:
    """``mf<yyyymmdd>`` (``e`` appended for Ed25519), with ``-2``, ``-3``... if already taken."""
    base = "mf" + datetime.fromtimestamp(now, UTC).strftime("%Y%m%d") + ("e" if algorithm == ED25519 else "")
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def normalize_domain(domain: str) -> str:
    """The domain in lower-case A-labels; DomainError for a name that cannot be one."""
    try:
        name = to_ascii(domain)
    except Exception as exc:  # PermanentDnsError: not a domain name
        raise DomainError(f"not a domain name: {domain!r}") from exc
    if "." not in name:
        raise DomainError(f"not a domain name: {domain!r} (a sending domain has a dot)")
    return name


def _selector(key: bytes, domain: str, taken: set[str], algorithm: str, state: str,
              now: float) -> dict[str, Any]:
    private, public = generate_key(algorithm)
    name = new_selector(taken, algorithm, now)
    return {"selector": name, "algorithm": algorithm, "public": public,
            "private": seal(key, private, _aad(domain, name)), "created": now, "state": state}


def new_domain(key: bytes, domain: str, ed25519: bool = False, now: float | None = None) -> dict[str, Any]:
    """A fresh domain record: an active RSA-2048 selector, and an Ed25519 one if asked."""
    now = time.time() if now is None else now
    name = normalize_domain(domain)
    sels = [_selector(key, name, set(), RSA, "active", now)]
    if ed25519:
        sels.append(_selector(key, name, {s["selector"] for s in sels}, ED25519, "active", now))
    return {"domain": name, "created": now, "updated": now, "selectors": sels}


def rotated(key: bytes, rec: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """``rec`` with a new pending selector per algorithm that has an active one
    (an earlier pending one of that algorithm is replaced)."""
    now = time.time() if now is None else now
    keep = [s for s in rec["selectors"] if s["state"] != "pending"]
    taken = {s["selector"] for s in rec["selectors"]}
    algs = sorted({s["algorithm"] for s in keep if s["state"] == "active"}) or [RSA]
    new = []
    for alg in algs:
        s = _selector(key, rec["domain"], taken, alg, "pending", now)
        taken.add(s["selector"])
        new.append(s)
    return {**rec, "selectors": keep + new, "updated": now}


def promoted(rec: dict[str, Any], selector: str, now: float | None = None) -> dict[str, Any]:
    """``rec`` with ``selector`` active and the active one of its algorithm retired."""
    target = next((s for s in rec["selectors"] if s["selector"] == selector), None)
    if target is None:
        raise DomainError(f"{rec['domain']} has no selector {selector!r}")
    sels = []
    for s in rec["selectors"]:
        if s["selector"] == selector:
            s = {**s, "state": "active"}
        elif s["algorithm"] == target["algorithm"] and s["state"] == "active":
            s = {**s, "state": "retired", "retired": time.time() if now is None else now}
        sels.append(s)
    return {**rec, "selectors": sels, "updated": time.time() if now is None else now}


def private_key(key: bytes, rec: dict[str, Any], sel: dict[str, Any]) -> bytes:
    return unseal(key, sel["private"], _aad(rec["domain"], sel["selector"]))


def public_view(rec: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """What may be shown: everything but the sealed private keys, plus the DNS records."""
    out = {**rec, "selectors": [{k: v for k, v in s.items() if k != "private"} for s in rec["selectors"]]}
    if settings is not None:
        out["dns"] = dns_records(rec, settings)
    return out


# --------------------------------------------------------------------------- DNS records


def dkim_value(sel: dict[str, Any]) -> str:
    k = "ed25519" if sel["algorithm"] == ED25519 else "rsa"
    return f"v=DKIM1; k={k}; p={sel['public']}"


def dns_records(rec: dict[str, Any], settings: Settings) -> list[dict[str, str]]:
    """The records to publish: one DKIM TXT per selector (active, pending and retired:
    a retired one still verifies mail in flight), an SPF and a DMARC suggestion."""
    d = rec["domain"]
    out = [{"name": f"{s['selector']}._domainkey.{d}", "type": "TXT", "value": dkim_value(s)}
           for s in rec["selectors"]]
    # SPF: the host mailflow says it is (EHLO); list the sending addresses instead if
    # that name does not resolve to them. ~all while testing, -all once it checks out.
    out.append({"name": d, "type": "TXT", "value": f"v=spf1 a:{settings.ehlo_name} ~all"})
    # DMARC: start with p=none and reports, tighten to quarantine/reject later.
    out.append({"name": f"_dmarc.{d}", "type": "TXT",
                "value": f"v=DMARC1; p=none; rua=mailto:postmaster@{d}; adkim=r; aspf=r"})
    return out


def zone_lines(records: list[dict[str, str]]) -> list[str]:
    """Zone-file lines; TXT values over 255 bytes as several strings (RFC 1035 §3.3.14)."""
    lines = []
    for r in records:
        v = r["value"]
        parts = " ".join('"' + v[i:i + 255].replace('"', '\\"') + '"' for i in range(0, len(v), 255))
        lines.append(f"{r['name']}.\t3600\tIN\t{r['type']}\t{parts}")
    return lines


def parse_tags(text: str) -> dict[str, str]:
    """``"v=DKIM1; k=rsa; p=AB CD"`` -> {"v": "DKIM1", "k": "rsa", "p": "ABCD"} (tag=value lists)."""
    out = {}
    for part in text.split(";"):
        k, sep, v = part.partition("=")
        if sep:
            out[k.strip().lower()] = "".join(v.split()) if k.strip().lower() == "p" else v.strip()
    return out


# --------------------------------------------------------------------------- the topic


def _producer(settings: Settings) -> Any:
    from confluent_kafka import Producer

    from mailflow.kafka_io import producer_config
    from streams.topics import ensure_topics

    ensure_topics(settings)
    return Producer(producer_config(settings.kafka_bootstrap, **{"message.timeout.ms": 15000}))


def write(settings: Settings, domain: str, rec: dict[str, Any] | None) -> None:
    """Put ``rec`` (None: a tombstone, the domain removed) on the topic, acks=all."""
    from streams.topics import full_name

    p = _producer(settings)
    errors: list[Any] = []
    p.produce(full_name(settings, TOPIC), key=domain.encode(),
              value=orjson.dumps(rec) if rec is not None else None,
              on_delivery=lambda err, _m: errors.append(err) if err else None)
    if p.flush(20) != 0 or errors:
        raise RuntimeError(f"could not write to the domains topic: {errors or 'timeout'}")


def read_all(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every domain record now on the topic (latest per domain)."""
    from confluent_kafka import KafkaException

    from mailflow.kafka_io import read_to_end
    from streams.topics import ensure_topics, full_name

    ensure_topics(settings)
    for attempt in range(5):
        try:
            records = read_to_end(settings.kafka_bootstrap, full_name(settings, TOPIC), idle_timeout=5)
            break
        except KafkaException:  # a topic just made may have no leader for a moment
            if attempt == 4:
                raise
            time.sleep(0.5)
    out: dict[str, dict[str, Any]] = {}
    for k, v in records:
        key = (k or b"").decode()
        if v is None:
            out.pop(key, None)
        else:
            try:
                out[key] = orjson.loads(v)
            except orjson.JSONDecodeError:
                continue
    return out


def add(settings: Settings, domain: str, ed25519: bool = False) -> dict[str, Any]:
    """Make a domain with new keys; DomainError if it has some already."""
    name = normalize_domain(domain)
    if name in read_all(settings):
        raise DomainError(f"{name} has DKIM keys already (use `mailflow domains rotate {name}`)")
    rec = new_domain(operator_key(settings), name, ed25519)
    write(settings, name, rec)
    return rec


def ensure(settings: Settings, domains: list[str]) -> list[str]:
    """Keys for each of ``domains`` that has none (``mailflow up``); the ones made."""
    have = read_all(settings)
    made = []
    for d in domains:
        name = normalize_domain(d)
        if name not in have:
            write(settings, name, new_domain(operator_key(settings), name))
            made.append(name)
    return made


def follow(settings: Settings, wait: float = 10.0) -> Any:
    """A CompactedReader of the domains topic, read to the end it had when called."""
    from mailflow.kafka_io import CompactedReader
    from streams.topics import full_name

    reader = CompactedReader(settings.kafka_bootstrap, [full_name(settings, TOPIC)])
    wait_caught_up(reader, settings, wait)
    return reader


def wait_caught_up(reader: Any, settings: Settings, timeout: float) -> bool:
    """Block until ``reader`` has every record the domains topic held when called, so
    a process that just started signs (or answers) as the ones before it did."""
    import logging

    from confluent_kafka import Consumer, KafkaException, TopicPartition

    from streams.topics import full_name

    topic = full_name(settings, TOPIC)
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "mailflow-domains-probe",
                  "enable.auto.commit": False})
    try:
        md = c.list_topics(topic, timeout=5)
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
                for p in md.topics[topic].partitions}
    except KafkaException:
        ends = {}
    finally:
        c.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(reader.positions.get((topic, p), 0) >= e for p, e in ends.items() if e > 0):
            return True
        time.sleep(0.05)
    logging.getLogger("mailflow.domains").warning(
        "the domains topic was not read to its end in %.0fs; domains not seen yet count once they arrive",
        timeout)
    return False


# --------------------------------------------------------------------------- DNS


def resolver(settings: Settings) -> dns.asyncresolver.Resolver:
    """A dnspython resolver on ``MAILFLOW_DNS`` (else the system's)."""
    r = dns.asyncresolver.Resolver(configure=not settings.dns)
    if settings.dns:
        r.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in parse_nameservers(settings.dns)]
    r.timeout, r.lifetime = 2.0, 5.0
    return r


async def txt(res: dns.asyncresolver.Resolver, name: str) -> list[str] | None:
    """The TXT strings at ``name`` (each record's strings joined); None when there are none."""
    try:
        answer = await res.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]


@dataclass(frozen=True)
class Finding:
    what: str  # SPF | DKIM <selector> | DMARC
    ok: bool
    text: str


async def check(settings: Settings, rec: dict[str, Any]) -> list[Finding]:
    """What DNS says about ``rec``'s domain: SPF, each selector's DKIM key, DMARC."""
    res, d = resolver(settings), rec["domain"]
    out: list[Finding] = []

    async def look(name: str) -> list[str] | None | str:
        try:
            return await txt(res, name)
        except dns.exception.DNSException as exc:
            return f"DNS error ({type(exc).__name__})"

    spf = await look(d)
    if isinstance(spf, str):
        out.append(Finding("SPF", False, f"{d}: {spf}"))
    else:
        found = [t for t in spf or [] if t.lower().startswith("v=spf1")]
        if not found:
            out.append(Finding("SPF", False, f"missing: no v=spf1 TXT record at {d}"))
        elif len(found) > 1:
            out.append(Finding("SPF", False, f"wrong: {len(found)} SPF records at {d} (RFC 7208 allows one)"))
        else:
            out.append(Finding("SPF", True, found[0]))
    for s in rec["selectors"]:
        name = f"{s['selector']}._domainkey.{d}"
        got = await look(name)
        label = f"DKIM {s['selector']} ({s['state']})"
        if isinstance(got, str):
            out.append(Finding(label, False, f"{name}: {got}"))
        elif not got:
            out.append(Finding(label, False, f"missing: no TXT record at {name}"))
        else:
            tags = parse_tags(got[0])
            if tags.get("p") == s["public"]:
                out.append(Finding(label, True, f"{name} publishes this selector's key"))
            elif not tags.get("p"):
                out.append(Finding(label, False, f"wrong: {name} has no key (p= empty: revoked)"))
            else:
                out.append(Finding(label, False, f"wrong: {name} publishes another key than this selector's"))
    dmarc = await look(f"_dmarc.{d}")
    if isinstance(dmarc, str):
        out.append(Finding("DMARC", False, dmarc))
    else:
        found = [t for t in dmarc or [] if t.upper().startswith("V=DMARC1")]
        if not found:
            out.append(Finding("DMARC", False, f"missing: no v=DMARC1 TXT record at _dmarc.{d}"))
        else:
            policy = parse_tags(found[0]).get("p", "")
            ok = policy in ("none", "quarantine", "reject")
            out.append(Finding("DMARC", ok, found[0] if ok else f"wrong: p={policy!r} in {found[0]}"))
    return out


async def selector_published(res: dns.asyncresolver.Resolver, domain: str, sel: dict[str, Any]) -> bool:
    """Whether ``sel``'s TXT record resolves with its public key."""
    try:
        got = await txt(res, f"{sel['selector']}._domainkey.{domain}")
    except dns.exception.DNSException:
        return False
    return got is not None and bool(got) and parse_tags(got[0]).get("p") == sel["public"]
