"""Credentials: API keys for services, mailbox tokens for people.

Two kinds, one format ``<kind>_<id>_<secret>``:

* API key ``mf_<id>_<secret>``: sends as any address in its domains
  (``example.com`` exactly, ``*.example.com`` for subdomains, ``*`` for every
  domain: an operator/admin key). Reads the status of mail sent from its domains;
  only an admin key (``*``) reads mailboxes.
* Mailbox token ``mft_<id>_<secret>``: reads only its own mailbox and sends only
  as its own address.

``<id>`` is 12 hex characters, public (it names the credential in ``keys list``
and in the ``auth`` topic); ``<secret>`` is 32 random bytes (``secrets``), URL-safe
base64. Only ``sha256(secret)`` is stored: the secret has 256 bits of entropy, so
a slow password hash (scrypt) would add nothing against brute force but would cost
milliseconds of CPU on every request. Comparison uses `hmac.compare_digest`.

Records live on the compacted ``auth`` topic (key: credential id; the latest
record wins, so revoking writes the record again with ``revoked`` set). Every API
replica follows the topic (`AuthReader`), so a new or revoked credential takes
effect everywhere within about a second, and survives restarts.

``MAILFLOW_AUTH`` = ``required`` (default) or ``off`` (local experiments only:
every request acts as an admin).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from mailflow.config import Settings
from mailflow.kafka_io import CompactedReader, coordinates, partition_of
from mailflow.kafka_ready import BrokerNotReady, is_transient, wait_for_partitions
from mailflow.rules.mailrules import AddressError, addresses, mailbox_key, normalize_address
from streams.topics import full_name

KEY_PREFIX = "mf"
TOKEN_PREFIX = "mft"
ADMIN = "*"
# Seconds the first end-offset request may take before the partition's metadata is
# read again (each later one twice that).
END_OFFSET_TRY = 1.0


def auth_mode() -> str:
    mode = os.environ.get("MAILFLOW_AUTH", "required").strip().lower() or "required"
    if mode not in ("required", "off"):
        raise ValueError(f"MAILFLOW_AUTH must be required or off, not {mode!r}")
    return mode


def hash_secret(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def parse_credential(text: str) -> tuple[str, str, str] | None:
    """(kind, id, secret) from ``mf_<id>_<secret>`` / ``mft_<id>_<secret>``."""
    kind, sep, rest = text.partition("_")
    cred_id, sep2, secret = rest.partition("_")
    if not sep or not sep2 or kind not in (KEY_PREFIX, TOKEN_PREFIX):
        return None
    if len(cred_id) != 12 or any(c not in "0123456789abcdef" for c in cred_id) or len(secret) < 20:
        return None
    return ("key" if kind == KEY_PREFIX else "token"), cred_id, secret


def normalize_domains(domains: list[str]) -> list[str]:
    out = []
    for d in domains:
        d = d.strip().lower()
        if not d:
            continue
        if d != ADMIN:
            bare = d[2:] if d.startswith("*.") else d
            if not bare or "@" in bare or any(c.isspace() for c in bare) or bare.startswith("."):
                raise ValueError(f"not a domain: {d!r}")
        out.append(d)
    if not out:
        raise ValueError("at least one domain is required")
    return sorted(set(out))


def domain_allowed(domains: list[str] | tuple[str, ...], address: str) -> bool:
    if not address or "@" not in address:
        return False
    dom = address.rpartition("@")[2].lower()
    for d in domains:
        if d == ADMIN or d == dom or (d.startswith("*.") and dom.endswith(d[1:])):
            return True
    return False


# ---- principals ------------------------------------------------------------------
@dataclass(frozen=True)
class Principal:
    """Who made a request, and what it may do."""

    id: str
    kind: str  # key | token | anonymous (MAILFLOW_AUTH=off)
    domains: tuple[str, ...] = ()
    address: str = ""
    name: str = ""

    @property
    def admin(self) -> bool:
        return self.kind == "anonymous" or (self.kind == "key" and ADMIN in self.domains)

    def may_send_as(self, address: str) -> bool:
        if self.admin:
            return True
        if self.kind == "token":
            return bool(address) and self._is_mine(address)
        return domain_allowed(self.domains, address)

    def may_read_mailbox(self, address: str) -> bool:
        """`address`: a mailbox key (`mailbox_key`); a token reads its own, whatever
        the case of the local part it was made for."""
        if self.admin:
            return True
        if self.kind != "token":
            return False
        try:
            return address == mailbox_key(self.address)
        except AddressError:
            return False

    def may_read_status(self, sender: str | None) -> bool:
        if self.admin:
            return True
        if not sender:
            return False
        if self.kind == "token":
            return self._is_mine(sender)
        return domain_allowed(self.domains, sender)

    def _is_mine(self, address: str) -> bool:
        """Whether `address` names this token's mailbox: its local part in any case,
        as the mailbox itself is keyed (`mailbox_key`), so a token may send as, and
        read the status of, ``Me@`` as well as ``me@``."""
        if address == self.address:
            return True
        try:
            return mailbox_key(address) == mailbox_key(self.address)
        except AddressError:
            return False


ANONYMOUS = Principal(id="anonymous", kind="anonymous", domains=(ADMIN,))


def header_from_addresses(raw_headers: Any) -> list[str]:
    """Every address in the fields naming a sender (From, Sender, Resent-From,
    Resent-Sender) of a parsed header block."""
    values = [str(v) for n in ("From", "Sender", "Resent-From", "Resent-Sender")
              for v in (raw_headers.get_all(n) or [])]
    out = []
    for _, addr in addresses(values):
        try:
            out.append(normalize_address(addr))
        except AddressError:
            out.append(addr or "")
    return out


# ---- the auth topic: follow, look up, verify ---------------------------------------
class SyncReader(CompactedReader):
    """A CompactedReader that also knows how far it has read, so a caller can wait
    until it has seen everything written before now (`sync`)."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self._bootstrap = bootstrap
        self._sync_lock = threading.Lock()
        self._last_sync: dict[str, float] = {}
        self._ends: dict[tuple[str, int], _SharedQuery] = {}
        super().__init__(bootstrap, topics)

    def partition_for(self, topic: str, key: bytes) -> int | None:
        """The partition of `key` on `topic` (Kafka's murmur2, as the producers use),
        or None before the reader has the topic's metadata."""
        n = self.partitions.get(topic)
        return partition_of(key, n) if n else None

    async def caught_up(self, topic: str, partition: int, within: float = 15.0) -> bool:
        """Wait until every record on one partition that existed when called has been
        read; False on timeout or broker trouble.

        The async, one-partition form of `sync`, for a request's hot path: a key's
        records live on one partition, so one end-offset query answers it, and the
        concurrent callers of a partition share their queries (`_SharedQuery`; the
        first caller's `within` bounds each query of that partition).
        """
        shared = self._ends.get((topic, partition))
        if shared is None:
            shared = self._ends[(topic, partition)] = _SharedQuery(
                lambda: self._end_offset(topic, partition, within))
        deadline = time.monotonic() + within
        while True:
            try:
                end = await asyncio.wait_for(shared.get(), max(0.1, deadline - time.monotonic()))
                break
            except Exception:  # KafkaException, TimeoutError: the broker did not answer
                # On a cluster, a partition whose leader just died answers nothing
                # until the controller has fenced it and elected another (6 s or so):
                # ask again until `within` is spent rather than refuse at once. With
                # every broker away the ingress answers 503 before it gets here.
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(0.25)
        while self.positions.get((topic, partition), 0) < end:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def _probe_consumer(self) -> Any:
        """The consumer that asks end offsets (never subscribes); call under `_sync_lock`."""
        from confluent_kafka import Consumer

        if not hasattr(self, "_probe"):
            self._probe = Consumer({"bootstrap.servers": self._bootstrap,
                                    "group.id": "mailflow-auth-probe", "enable.auto.commit": False})
        return self._probe

    def _end_offset(self, topic: str, partition: int, timeout: float) -> int:
        """The partition's end offset, asked of its leader, within `timeout` s.

        Asked in short tries, the topic's metadata read again between them: librdkafka
        sends the offsets request to the leader its metadata cache names, and after a
        leader's kill -9 that stays the dead node until something refreshes the cache,
        which for this never-subscribed consumer is nothing but the node coming back.
        A single long try therefore times out even once a new leader is elected;
        short tries find it within about a second of its election (docs/BENCHMARKS.md).
        """
        from confluent_kafka import KafkaException, TopicPartition

        with self._sync_lock:
            probe = self._probe_consumer()
        # Outside the lock: librdkafka takes concurrent queries, and a slow one must
        # not hold up another partition's or another topic's.
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            # 1 s, then 2 s: a leader that is alive but slow (a saturated machine) is
            # given longer rather than asked again too soon, and a new leader is still
            # found within 2 s of its election.
            attempt += 1
            try_for = max(0.1, min(END_OFFSET_TRY * min(attempt, 2), deadline - time.monotonic()))
            try:
                return int(probe.get_watermark_offsets(TopicPartition(topic, partition),
                                                       timeout=try_for)[1])
            except KafkaException as exc:
                # NOT_LEADER for a moment from a leader still taking over, or the dead
                # leader's timeout: the transient errors of kafka_ready.
                if not is_transient(exc) or time.monotonic() >= deadline:
                    raise
            try:
                probe.list_topics(topic, timeout=max(0.1, min(END_OFFSET_TRY, deadline - time.monotonic())))
            except KafkaException:
                pass
            time.sleep(0.1)

    def sync(self, topic: str, timeout: float = 3.0, min_interval: float = 0.0) -> bool:
        """Wait (blocking; call from a thread) until every record on `topic` that
        existed when called has been read. False on timeout or broker trouble."""
        from confluent_kafka import KafkaException

        if min_interval and time.monotonic() - self._last_sync.get(topic, 0.0) < min_interval:
            return True
        try:
            with self._sync_lock:
                probe = self._probe_consumer()
            marks = wait_for_partitions(probe, [topic], timeout)
        except (KafkaException, BrokerNotReady):
            return False
        ends = {p: high for (_t, p), (_low, high) in marks.items()}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.positions.get((topic, p), 0) >= end for p, end in ends.items()):
                self._last_sync[topic] = time.monotonic()
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        super().close()
        if hasattr(self, "_probe"):
            self._probe.close()


class _SharedQuery:
    """One blocking query (run in a thread) answering every concurrent caller.

    A caller needs an answer from a query that started after it asked (one already
    running may have read the end offset before a record the caller must see was
    written), so the callers that arrive while a query runs share the next one,
    which starts as soon as the running one ends: under load one query per round
    trip serves them all, instead of one query each.
    """

    def __init__(self, query: Any) -> None:
        self._query = query
        self._next: asyncio.Future[Any] | None = None
        self._running = False

    async def get(self) -> Any:
        fut = self._next
        if fut is None:
            fut = self._next = asyncio.get_running_loop().create_future()
            if not self._running:
                self._start()
        return await asyncio.shield(fut)

    def _start(self) -> None:
        fut, self._next = self._next, None
        assert fut is not None
        self._running = True
        task = asyncio.get_running_loop().run_in_executor(None, self._query)

        def done(t: asyncio.Future[Any]) -> None:
            self._running = False
            if t.cancelled():  # the loop is closing
                fut.cancel()
            elif not fut.done():
                if t.exception() is not None:
                    fut.set_exception(t.exception())  # type: ignore[arg-type]
                else:
                    fut.set_result(t.result())
            if self._next is not None:
                self._start()

        task.add_done_callback(done)


class Authenticator:
    """Checks ``Authorization: Bearer <credential>`` against the ``auth`` topic."""

    def __init__(self, settings: Settings, reader: SyncReader) -> None:
        self.topic = full_name(settings, "auth")
        self.reader = reader
        self.mode = auth_mode()

    def record(self, cred_id: str) -> dict[str, Any] | None:
        return self.reader.values[self.topic].get(cred_id)

    def verify(self, header: str | None, wait: bool = True) -> tuple[Principal | None, str]:
        """(principal, "") or (None, why): why is safe to show (never the secret).

        With `wait`, an unknown id (created a moment ago?) blocks until the reader
        has caught up with the topic; call it from a thread then.
        """
        if self.mode == "off":
            return ANONYMOUS, ""
        if not header:
            return None, "an Authorization: Bearer <API key or mailbox token> header is required"
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None, "use Authorization: Bearer <API key or mailbox token>"
        parsed = parse_credential(value.strip())
        if parsed is None:
            return None, "the credential is malformed"
        kind, cred_id, secret = parsed
        rec = self.record(cred_id)
        if rec is None and wait:
            self.reader.sync(self.topic, timeout=3.0, min_interval=0.5)
            rec = self.record(cred_id)
        if rec is None and not wait:
            return None, "unknown credential?"
        if rec is None or rec.get("kind") != kind:
            return None, "unknown credential"
        if not hmac.compare_digest(hash_secret(secret), str(rec.get("hash", ""))):
            return None, "unknown credential"
        if rec.get("revoked"):
            return None, "the credential has been revoked"
        return Principal(id=cred_id, kind=kind, domains=tuple(rec.get("domains") or ()),
                         address=rec.get("address") or "", name=rec.get("name") or ""), ""


# ---- writing and reading credentials (CLI, harness, demo) -----------------------------
def _new_id() -> str:
    return secrets.token_hex(6)


def _produce(settings: Settings, key: str, record: dict[str, Any]) -> None:
    from confluent_kafka import Producer

    from mailflow.kafka_io import producer_config
    from streams.topics import ensure_topics

    ensure_topics(settings)
    p = Producer(producer_config(settings.kafka_bootstrap, **{"message.timeout.ms": 15000}))
    errors: list[Any] = []
    p.produce(full_name(settings, "auth"), key=key.encode(), value=orjson.dumps(record),
              on_delivery=lambda err, _m: errors.append(err) if err else None)
    if p.flush(20) != 0 or errors:
        raise RuntimeError(f"could not write to the auth topic: {errors or 'timeout'}")


def create_key(settings: Settings, domains: list[str], name: str = "") -> tuple[str, dict[str, Any]]:
    """A new API key: (the plaintext, shown once; the stored record)."""
    cred_id, secret = _new_id(), secrets.token_urlsafe(32)
    rec = {"id": cred_id, "kind": "key", "name": name, "domains": normalize_domains(domains),
           "hash": hash_secret(secret), "created": time.time(), "revoked": None}
    _produce(settings, cred_id, rec)
    return f"{KEY_PREFIX}_{cred_id}_{secret}", rec


def create_token(settings: Settings, address: str, name: str = "") -> tuple[str, dict[str, Any]]:
    """A new mailbox token for `address`: (the plaintext, shown once; the record)."""
    addr = normalize_address(address)
    cred_id, secret = _new_id(), secrets.token_urlsafe(32)
    rec = {"id": cred_id, "kind": "token", "name": name, "address": addr, "domains": [],
           "hash": hash_secret(secret), "created": time.time(), "revoked": None}
    _produce(settings, cred_id, rec)
    return f"{TOKEN_PREFIX}_{cred_id}_{secret}", rec


def read_all(settings: Settings, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """Every credential record now on the auth topic (latest per id)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from streams.topics import ensure_topics

    ensure_topics(settings)
    name = full_name(settings, "auth")
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "mailflow-auth-cli",
                  "enable.auto.commit": False})
    out: dict[str, dict[str, Any]] = {}
    try:
        # Bounded wait for a broker that has just become ready (the first `mailflow up`).
        marks = wait_for_partitions(c, [name], max(timeout, 60.0))
        parts = [p for _t, p in marks]
        ends = {p: marks[(name, p)][1] for p in parts}
        remaining = {p for p, e in ends.items() if e > 0}
        c.assign([TopicPartition(name, p, OFFSET_BEGINNING) for p in parts])
        deadline = time.monotonic() + timeout
        while remaining and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            key = (m.key() or b"").decode()
            value = m.value()
            if value is None:
                out.pop(key, None)
            else:
                try:
                    out[key] = orjson.loads(value)
                except orjson.JSONDecodeError:
                    pass
            _topic, partition, offset = coordinates(m)
            if offset + 1 >= ends[partition]:
                remaining.discard(partition)
    finally:
        c.close()
    return out


def revoke(settings: Settings, cred_id: str) -> dict[str, Any] | None:
    rec = read_all(settings).get(cred_id)
    if rec is None:
        return None
    if not rec.get("revoked"):
        rec = {**rec, "revoked": time.time()}
        _produce(settings, cred_id, rec)
    return rec


# ---- demo credentials for `mailflow up` --------------------------------------------
def ensure_demo_credentials(settings: Settings) -> tuple[str, str]:
    """(demo API key, demo mailbox token), created once and kept in
    ``DATA_DIR/demo-credentials.json`` (mode 0600) so every `mailflow up` prints the
    same working pair. The key sends as the local domains; the token is for
    ``demo@<first local domain>``. Re-created if the auth topic lost them (a new
    broker or topic prefix) or they were revoked."""
    path = Path(settings.data_dir) / "demo-credentials.json"
    domains = sorted(settings.local_domains) or ["mailflow.local"]
    address = f"demo@{domains[0]}"
    known = read_all(settings)
    saved: dict[str, Any] = {}
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}

    def still_valid(text: str | None) -> bool:
        parsed = parse_credential(text or "")
        if not parsed:
            return False
        rec = known.get(parsed[1])
        return rec is not None and not rec.get("revoked") and hmac.compare_digest(
            hash_secret(parsed[2]), str(rec.get("hash", "")))

    key = saved.get("key") if still_valid(saved.get("key")) else None
    token = saved.get("token") if (still_valid(saved.get("token"))
                                   and saved.get("address") == address) else None
    if key and token:
        return key, token
    if not key:
        key, _ = create_key(settings, domains, name="demo")
    if not token:
        token, _ = create_token(settings, address, name="demo")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"key": key, "token": token, "address": address, "domains": domains}, f)
    os.chmod(path, 0o600)
    return key, token
