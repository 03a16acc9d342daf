"""`mailflow queue`: the operators' queue tools (mailq/qshape, postsuper -h/-H, postqueue -f).

What an operator can do, and where each action lives:

* ``mailflow queue [show] [--json]``: waiting mail by stage (consumer lag, as
  `mailflow lag`) and, for the delivery queues, by recipient domain and age in
  qshape's buckets (0-5m ... 80m+, age since the message was accepted): ``delivery``
  (waiting for the deliver stage), ``deferred`` (the retry tiers), ``held``.
* ``queue hold DOMAIN | --id ID`` / ``queue release DOMAIN | --id ID``: no delivery
  attempt for that domain or message until released. The deliver stage puts a
  held record on ``retry.hold`` (key: domain) with a ``held`` event instead of
  trying it, so no attempt is spent and the mail stays on a topic, as the retry
  stage's consumer lag. The retry stage keeps the records of ``retry.hold`` it
  reads while they are held (uncommitted, in memory) and forwards them to
  ``delivery`` once released (see `plan_lane` for how one partition carries many
  domains without a held one blocking a released one).
* ``queue flush [DOMAIN]``: deferred mail (for that domain, or all) written to a
  retry tier before the flush is due now. The retry stage reads the flush, takes
  each matching record as due, and for a domain reads its tier partitions past a
  head that is not due (`flush_scan`), so mail of the domain behind other
  domains' mail goes now too; a ``flushed`` marker says how far that read went,
  so the record is not forwarded a second time when the head reaches it.
* ``queue bounce --id ID``: every recipient of the message still waiting (on
  ``delivery``, deferred or held) ends ``bounced`` with an RFC 3464 report to the
  sender (reason ``operator``), as if a remote server had refused it for good.

Every action is a record on the compacted topic ``queue.control`` (one
partition; key ``hold|domain|D``, ``hold|id|ID``, ``flush|*``, ``flush|domain|D``,
``bounce|id|ID``, and the retry stage's ``flushed|...`` markers), which the
deliver and retry stages follow (`ControlView`) and read to its end before they
handle anything: an action survives the restart of any stage, kill -9 included.
An action takes effect within about a second of being written (the time the
stages take to read it); mail already in an SMTP transaction finishes it.

Held mail and ``MAX_QUEUE_AGE``: like Postfix's hold queue, held mail is kept
until it is released or bounced, however long that is; it never expires while
held. The time spent held does not count towards its queue age: on release the
message's first-attempt time moves forward by the time it was held, so a message
held for a week is not bounced as expired at its first attempt after the release.

The pure decisions (`hold_of`, `still_held`, `bounce_requested`, `effective_due`,
`covered`, `released`, `plan_lane`, `age_bucket`) are plain functions; the
stages, the CLI and ``GET /v1/queue`` call them.
"""

from __future__ import annotations

import re
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from mailflow.config import Settings
from schemas.mail import Delivery, RetryState, parse_delivery
from schemas.records import PoisonPill
from streams.topics import ensure_topics, full_name

CONTROL = "queue.control"  # short topic names
HOLD = "retry.hold"

# qshape's buckets (minutes), up to 80m: 0-5m, 5-10m, 10-20m, 20-40m, 40-80m, 80m+.
BUCKETS = (5, 10, 20, 40, 80)
BUCKET_LABELS = ("0-5m", "5-10m", "10-20m", "20-40m", "40-80m", "80m+")
# How many records `snapshot` reads per queue at most (a backlog of millions
# would take minutes); past it the breakdown says it is partial.
SNAPSHOT_MAX_RECORDS = 200_000

OPERATOR_BOUNCE_REPLY = "5.0.0 message returned to the sender by the mail system's operator"

_DOMAIN = re.compile(r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_ID = re.compile(r"^[A-Za-z0-9._@+=-]{1,128}$")


def normal_domain(text: str) -> str:
    """A domain as the control records key it (lower case, IDNA); ValueError if it is none."""
    d = text.strip().rstrip(".").lower()
    try:
        d = d.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"not a domain: {text!r}") from None
    if not _DOMAIN.match(d):
        raise ValueError(f"not a domain: {text!r}")
    return d


def normal_id(text: str) -> str:
    """A message id as given by `mailflow send`/the API; ValueError if it cannot be one."""
    if not _ID.match(text.strip()):
        raise ValueError(f"not a message id: {text!r}")
    return text.strip()


# --------------------------------------------------------------------------- the control state


@dataclass
class Controls:
    """The control topic's current state, parsed: what the decisions below read."""

    holds: dict[str, dict[str, Any]] = field(default_factory=dict)  # "domain|D" / "id|X" -> hold (held only)
    flushes: dict[str, float] = field(default_factory=dict)  # "*" / "domain|D" -> ts
    bounces: dict[str, float] = field(default_factory=dict)  # message id -> ts
    # (flush key, topic, partition) -> (flush ts, last offset read by the flush's scan)
    flushed: dict[tuple[str, str, int], tuple[float, int]] = field(default_factory=dict)


def parse_controls(values: dict[str, Any]) -> Controls:
    """`Controls` from the control topic's latest value per key; unreadable entries are
    left out (the topic is ours, but nothing read from Kafka is trusted)."""
    c = Controls()
    for key, v in values.items():
        if not isinstance(v, dict):
            continue
        kind, _, rest = key.partition("|")
        try:
            if kind == "hold" and v.get("held") is True:
                c.holds[rest] = {**v, "since": float(v["since"])}
            elif kind == "flush":
                c.flushes[rest] = float(v["ts"])
            elif kind == "bounce" and rest.startswith("id|"):
                c.bounces[rest[3:]] = float(v["ts"])
            elif kind == "flushed":
                fkey, topic, part = rest.rsplit("|", 2)
                c.flushed[(fkey, topic, int(part))] = (float(v["flush_ts"]), int(v["through"]))
        except (KeyError, TypeError, ValueError):
            continue
    return c


def hold_of(c: Controls, domain: str, msg_id: str) -> dict[str, Any] | None:
    """The hold in force for a message's record to `domain`, or None: one on the
    message itself first, else one on the domain."""
    return c.holds.get(f"id|{msg_id}") or c.holds.get(f"domain|{domain.lower()}")


def bounce_requested(c: Controls, msg_id: str, state: RetryState) -> float | None:
    """When an operator asked to bounce this message, if that request applies to this
    record (its `RetryState`): not to a copy put back by `mailflow replay` after the
    request."""
    ts = c.bounces.get(msg_id)
    if ts is None or (state.replayed_at or 0.0) > ts:
        return None
    return ts


def still_held(c: Controls, domain: str, msg_id: str, state: RetryState) -> bool:
    """Whether a record on ``retry.hold`` (held at `state.held_at`) must stay there.

    It goes back to delivery once nothing holds it, once a bounce was asked for it
    (the deliver stage bounces it), and once the hold in force now began after the
    record was held: a release came in between (the deliver stage holds it again
    under the new hold, with a new ``held`` event)."""
    if bounce_requested(c, msg_id, state) is not None:
        return False
    hold = hold_of(c, domain, msg_id)
    return hold is not None and float(hold["since"]) <= (state.held_at or 0.0)


def flush_keys(domain: str, msg_id: str) -> list[str]:
    """The flush-like control keys that can apply to a record (see `effective_due`)."""
    return ["*", f"domain|{domain.lower()}", f"id|{msg_id}"]


def _flush_ts(c: Controls, key: str) -> float | None:
    if key.startswith("id|"):
        return c.bounces.get(key[3:])  # a bounce request makes the message due now
    return c.flushes.get(key)


def effective_due(c: Controls, due: float, written: float, domain: str, msg_id: str) -> float:
    """When a deferred record (due at `due`, written to its tier at `written`) is due,
    given the flushes and bounce requests: a flush (of all, or of its domain) or a
    bounce of its message made after it was written makes it due at that moment."""
    out = due
    for key in flush_keys(domain, msg_id):
        f = _flush_ts(c, key)
        if f is not None and written <= f < out:
            out = f
    return out


def scan_keys(c: Controls) -> dict[str, float]:
    """The flushes whose matching records must be looked for past a tier's head:
    domain flushes and bounce requests (a flush of everything needs no scan: every
    head is due, and everything behind it)."""
    out = {k: f for k, f in c.flushes.items() if k != "*"}
    out.update({f"id|{i}": ts for i, ts in c.bounces.items()})
    return out


def key_matches(key: str, domain: str, msg_id: str) -> bool:
    return key in flush_keys(domain, msg_id)


def covered(c: Controls, topic: str, partition: int, offset: int, domain: str, msg_id: str,
            written: float) -> bool:
    """Whether a flush's scan already forwarded this deferred record: its offset is
    within what the scan read, and it matches that flush and was written before it."""
    for key in flush_keys(domain, msg_id)[1:]:
        mark = c.flushed.get((key, topic, partition))
        if mark is not None and offset <= mark[1] and written <= mark[0]:
            return True
    return False


def released(state: RetryState, now: float) -> RetryState:
    """A held record's state as it goes back to delivery: the time it was held does
    not count towards its queue age (its first attempt moves forward by it), and its
    history says how long it was held."""
    held_for = max(0.0, now - (state.held_at or now))
    first = state.first_attempt
    return state.with_(held_at=None, first_attempt=None if first is None else first + held_for,
                       history=state.add_history({"ts": now, "held_for": round(held_for, 3)}))


@dataclass
class LaneEntry:
    """One record of a ``retry.hold`` partition that the retry stage has read."""

    offset: int
    domain: str
    msg_id: str
    state: RetryState
    record: Any = None  # the consumed Kafka message


def plan_lane(c: Controls, lane: list[LaneEntry]) -> list[tuple[str, LaneEntry]] | None:
    """What to do with the records read from one ``retry.hold`` partition and not yet
    committed past, in offset order: None while every one is still held (nothing to
    do: the commit stays at the first, so all of them are lag), else every entry
    with "forward" (to delivery) or "reappend" (to the end of the same partition,
    still held), after which the partition is committed past the last one.

    One partition carries many domains: re-appending the still-held records is what
    lets a released record behind them go without committing past a held one (the
    copies are read again and kept). It costs one copy of the held records of the
    partition per release that frees something behind them, not one per record."""
    plan = [("reappend" if still_held(c, e.domain, e.msg_id, e.state) else "forward", e) for e in lane]
    if all(action == "reappend" for action, _ in plan):
        return None
    return plan


def age_bucket(age_seconds: float) -> int:
    """The index of qshape's age bucket (`BUCKET_LABELS`) for a message this old."""
    minutes = age_seconds / 60.0
    for i, upper in enumerate(BUCKETS):
        if minutes < upper:
            return i
    return len(BUCKETS)


@dataclass
class Shape:
    """qshape's table for one queue: messages per recipient domain and age bucket."""

    total: int = 0
    ages: list[int] = field(default_factory=lambda: [0] * len(BUCKET_LABELS))
    domains: dict[str, list[int]] = field(default_factory=dict)
    partial: bool = False

    def add(self, domain: str, age: float) -> None:
        i = age_bucket(age)
        self.total += 1
        self.ages[i] += 1
        self.domains.setdefault(domain, [0] * len(BUCKET_LABELS))[i] += 1

    def to_json(self) -> dict[str, Any]:
        doms = sorted(self.domains.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
        return {"total": self.total, "ages": dict(zip(BUCKET_LABELS, self.ages, strict=True)),
                "partial": self.partial,
                "domains": {d: {"total": sum(a), "ages": dict(zip(BUCKET_LABELS, a, strict=True))}
                            for d, a in doms}}


def record_fields(key: bytes | None, value: bytes | None) -> tuple[str, Delivery] | None:
    """(domain, record) of a delivery/retry record, None if it is poison: the domain
    is the record's own (``meta.domain``), else its key, in lower case."""
    try:
        rec = parse_delivery(value)
    except PoisonPill:
        return None
    return (rec.domain or (key or b"").decode("utf-8", "replace")).lower(), rec


# --------------------------------------------------------------------------- following the topic


class ControlView:
    """Follows ``queue.control`` from its start in a thread: the latest value per key.

    `ready` is set once everything that was on the topic when the view started has
    been read: a stage waits for it before it handles a record, so a hold made
    before a crash is in force for the first record after the restart."""

    def __init__(self, settings: Settings) -> None:
        self.topic = full_name(settings, CONTROL)
        self.bootstrap = settings.kafka_bootstrap
        self.values: dict[str, Any] = {}
        self.version = 0
        self.ready = threading.Event()
        self._controls = Controls()
        self._parsed = -1
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="queue-control", daemon=True)
        self._thread.start()

    def controls(self) -> Controls:
        """The parsed state, parsed again only after a change."""
        with self._lock:
            if self._parsed != self.version:
                self._controls = parse_controls(dict(self.values))
                self._parsed = self.version
            return self._controls

    def apply(self, key: str, value: bytes | None) -> None:
        """One record read (or written by this process): the view's new state."""
        with self._lock:
            if value is None:
                self.values.pop(key, None)
            else:
                try:
                    self.values[key] = orjson.loads(value)
                except orjson.JSONDecodeError:
                    return
            self.version += 1

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

        from mailflow.kafka_io import coordinates

        c = Consumer({"bootstrap.servers": self.bootstrap, "enable.auto.commit": False,
                      "group.id": f"mailflow-queue-view-{uuid.uuid4().hex[:8]}"})  # never commits
        try:
            end = None
            while self._running and end is None:
                try:
                    if self.topic in c.list_topics(self.topic, timeout=5).topics:
                        end = c.get_watermark_offsets(TopicPartition(self.topic, 0), timeout=5)[1]
                except KafkaException:
                    pass
                if end is None:
                    time.sleep(0.5)
            c.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
            if not end:
                self.ready.set()
            while self._running:
                m = c.poll(0.2)
                if m is None and not self.ready.is_set():
                    # Compaction can leave the end offset past the last record left.
                    pos = c.position([TopicPartition(self.topic, 0)])[0].offset
                    if end is not None and pos >= end:
                        self.ready.set()
                if m is None or m.error():
                    continue
                self.apply((m.key() or b"").decode("utf-8", "replace"), m.value())
                if coordinates(m)[2] + 1 >= (end or 0):
                    self.ready.set()
        finally:
            c.close()

    def close(self) -> None:
        self._running = False
        self._thread.join(2)


def control_value(action: str, **fields: Any) -> bytes:
    return orjson.dumps({"action": action, "ts": time.time(), **fields})


def write_control(settings: Settings, records: Iterable[tuple[str, bytes]], timeout: float = 30) -> None:
    """Put control records on ``queue.control``; returns once the broker has each (acks=all)."""
    from confluent_kafka import Producer

    from mailflow.kafka_io import producer_config

    # Compacted, one partition: never left for a broker to create with its defaults.
    ensure_topics(settings)
    p = Producer(producer_config(settings.kafka_bootstrap))
    errors: list[Any] = []
    for key, value in records:
        p.produce(full_name(settings, CONTROL), key=key.encode(), value=value,
                  on_delivery=lambda err, _m: errors.append(err) if err else None)
    left = p.flush(timeout)
    if left or errors:
        raise RuntimeError(f"the broker did not take the queue action ({errors[0] if errors else 'timed out'})")


def read_controls(settings: Settings) -> Controls:
    from mailflow.kafka_io import read_to_end

    values: dict[str, Any] = {}
    for k, v in read_to_end(settings.kafka_bootstrap, full_name(settings, CONTROL), idle_timeout=5):
        key = (k or b"").decode("utf-8", "replace")
        if v is None:
            values.pop(key, None)
            continue
        try:
            values[key] = orjson.loads(v)
        except orjson.JSONDecodeError:
            continue
    return parse_controls(values)


# --------------------------------------------------------------------------- show


def _read_range(settings: Settings, ranges: list[tuple[str, int, int, int]],
                limit: int, timeout: float = 10.0) -> Iterator[tuple[str, int, int, Any]]:
    """(topic, partition, offset, message) for offsets [start, end) of each range."""
    from confluent_kafka import Consumer, TopicPartition

    from mailflow.kafka_io import coordinates

    todo = {(t, p): end for t, p, start, end in ranges if end > start}
    if not todo:
        return
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "enable.auto.commit": False,
                  "group.id": f"mailflow-queue-show-{uuid.uuid4().hex[:8]}", "enable.partition.eof": False})
    try:
        c.assign([TopicPartition(t, p, start) for t, p, start, end in ranges if end > start])
        seen = 0
        last = time.monotonic()
        while todo and seen < limit and time.monotonic() - last < timeout:
            m = c.poll(0.2)
            if m is None or m.error():
                continue
            last = time.monotonic()
            topic, partition, offset = coordinates(m)
            end = todo.get((topic, partition))
            if end is None:
                continue
            if offset + 1 >= end:
                del todo[(topic, partition)]
                c.pause([TopicPartition(topic, partition)])
            if offset < end:
                seen += 1
                yield topic, partition, offset, m
    finally:
        c.close()


def snapshot(settings: Settings) -> dict[str, Any]:
    """Everything `mailflow queue show` and ``GET /v1/queue`` answer, as one document."""
    from mailflow.ops import lag

    now = time.time()
    lags = lag.measure(settings)
    controls = read_controls(settings)
    hold_topic = full_name(settings, HOLD)
    delivery = full_name(settings, "delivery")
    queues = {"delivery": Shape(), "deferred": Shape(), "held": Shape()}
    ranges: list[tuple[str, int, int, int]] = []
    for s in lags:
        if s.stage not in ("deliver", "retry"):
            continue
        for p in s.partitions:
            if p.lag > 0:
                ranges.append((p.topic, p.partition, p.end - p.lag, p.end))
    for topic, part, offset, m in _read_range(settings, ranges, 3 * SNAPSHOT_MAX_RECORDS):
        name = "delivery" if topic == delivery else "held" if topic == hold_topic else "deferred"
        shape = queues[name]
        if shape.total >= SNAPSHOT_MAX_RECORDS:
            shape.partial = True
            continue
        fields_ = record_fields(m.key(), m.value())
        if fields_ is None:
            continue
        domain, rec = fields_
        msg_id, received = rec.id, rec.received_at
        written = m.timestamp()[1] / 1000.0
        if name == "deferred" and covered(controls, topic, part, offset, domain, msg_id, written):
            continue  # a flush sent it already; the tier's head has not reached it
        shape.add(domain, max(0.0, now - received))
    lag_doc = lag.to_json(lags)
    return {
        "ts": now,
        "buckets": list(BUCKET_LABELS),
        "stages": {k: {"total": v["total"], "oldest_age": v["oldest_age"], "consumers": v["consumers"],
                       "topics": v["topics"]} for k, v in lag_doc["stages"].items()},
        "queues": {k: v.to_json() for k, v in queues.items()},
        "holds": [{"kind": k.split("|", 1)[0], "value": k.split("|", 1)[1], "since": h["since"]}
                  for k, h in sorted(controls.holds.items())],
        "flushes": [{"domain": None if k == "*" else k.split("|", 1)[1], "ts": f}
                    for k, f in sorted(controls.flushes.items())],
        "bounces": [{"id": i, "ts": ts} for i, ts in sorted(controls.bounces.items())],
    }


def render(doc: dict[str, Any]) -> str:
    """qshape-like text of a `snapshot`."""
    import datetime as dt

    def when(ts: float) -> str:
        return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")

    lines = [f"{'stage':<11} {'waiting':>8} {'oldest':>8} {'consumers':>9}  input"]
    for stage, s in doc["stages"].items():
        oldest = f"{s['oldest_age']:.0f}s" if s["oldest_age"] is not None else "-"
        consumers = "?" if s["consumers"] is None else str(s["consumers"])
        topics = ",".join(t.split(".", 1)[-1] for t in s["topics"])
        lines.append(f"{stage:<11} {s['total']:>8} {oldest:>8} {consumers:>9}  {topics}")
    width = max([24, *(len(d) for q in doc["queues"].values() for d in q["domains"])])
    for name, q in doc["queues"].items():
        lines += ["", f"{name}: {q['total']} message(s)" + (" (partial)" if q["partial"] else "")]
        if not q["total"]:
            continue
        lines.append(f"{'':<{width}} {'T':>6} " + " ".join(f"{b:>7}" for b in doc["buckets"]))
        lines.append(f"{'TOTAL':<{width}} {q['total']:>6} " + " ".join(f"{n:>7}" for n in q["ages"].values()))
        for d, row in q["domains"].items():
            lines.append(f"{d:<{width}} {row['total']:>6} " + " ".join(f"{n:>7}" for n in row["ages"].values()))
    if doc["holds"]:
        lines += ["", "holds in force:"]
        lines += [f"  {h['kind']} {h['value']} since {when(h['since'])}" for h in doc["holds"]]
    if doc["flushes"] or doc["bounces"]:
        lines += ["", "last flushes and bounce requests:"]
        lines += [f"  flush {f['domain'] or '(all)'} at {when(f['ts'])}" for f in doc["flushes"]]
        lines += [f"  bounce {b['id']} at {when(b['ts'])}" for b in doc["bounces"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the commands


def _target(domain: str | None, msg_id: str | None) -> tuple[str, str]:
    if bool(domain) == bool(msg_id):
        raise ValueError("name a DOMAIN or --id ID (one of them)")
    return ("domain", normal_domain(domain)) if domain else ("id", normal_id(msg_id or ""))


def hold(settings: Settings, domain: str | None, msg_id: str | None) -> dict[str, Any]:
    kind, value = _target(domain, msg_id)
    key = f"hold|{kind}|{value}"
    current = read_controls(settings).holds.get(f"{kind}|{value}")
    if current is not None:  # keep the first `since`: records held under it stay held
        return {"action": "hold", kind: value, "since": current["since"], "already": True}
    now = time.time()
    write_control(settings, [(key, control_value("hold", held=True, since=now, **{kind: value}))])
    return {"action": "hold", kind: value, "since": now, "already": False}


def release(settings: Settings, domain: str | None, msg_id: str | None) -> dict[str, Any]:
    kind, value = _target(domain, msg_id)
    if read_controls(settings).holds.get(f"{kind}|{value}") is None:
        return {"action": "release", kind: value, "was_held": False}
    write_control(settings, [(f"hold|{kind}|{value}", control_value("release", held=False, **{kind: value}))])
    return {"action": "release", kind: value, "was_held": True}


def flush(settings: Settings, domain: str | None) -> dict[str, Any]:
    d = normal_domain(domain) if domain else None
    key = f"flush|domain|{d}" if d else "flush|*"
    value = control_value("flush", domain=d)
    write_control(settings, [(key, value)])
    return {"action": "flush", "domain": d, "ts": orjson.loads(value)["ts"]}


def bounce(settings: Settings, msg_id: str) -> dict[str, Any]:
    i = normal_id(msg_id)
    value = control_value("bounce", id=i)
    write_control(settings, [(f"bounce|id|{i}", value)])
    return {"action": "bounce", "id": i, "ts": orjson.loads(value)["ts"]}


def run(settings: Settings, action: str, domain: str | None = None, msg_id: str | None = None,
        as_json: bool = False) -> int:
    """`mailflow queue ACTION`; prints what it did, and one JSON line last."""
    try:
        if action == "show":
            doc = snapshot(settings)
            print(render(doc))
            if as_json:
                print(orjson.dumps(doc).decode())
            return 0
        if action == "hold":
            out = hold(settings, domain, msg_id)
            what = f"domain {out['domain']}" if "domain" in out else f"message {out['id']}"
            print(f"queue: {what} {'was already held' if out['already'] else 'held'}: no delivery "
                  "attempts until `mailflow queue release`", file=sys.stderr)
        elif action == "release":
            out = release(settings, domain, msg_id)
            what = f"domain {out['domain']}" if "domain" in out else f"message {out['id']}"
            print(f"queue: {what} " + ("released: its held mail goes to delivery now" if out["was_held"]
                                       else "was not held; nothing to release"), file=sys.stderr)
        elif action == "flush":
            out = flush(settings, domain)
            print(f"queue: deferred mail for {out['domain'] or 'every domain'} is due now", file=sys.stderr)
        elif action == "bounce":
            out = bounce(settings, msg_id or "")
            print(f"queue: message {out['id']}: each recipient still waiting ends bounced, "
                  "with a report to the sender", file=sys.stderr)
        else:
            raise ValueError(f"unknown queue action {action!r}")
    except ValueError as exc:
        print(f"mailflow: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"mailflow: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(out).decode())
    return 0
