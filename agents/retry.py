"""Retry stage.

Input: ``retry.1`` … ``retry.N`` (key: recipient domain), each tier with one fixed
delay (``RETRY_SCHEDULE``); every record is a `schemas.mail.Delivery` that carries
``meta.due`` (`parse_deferred`; one that does not is parked on ``errors``). Output:
``delivery`` (same key) once the record is due.

Within one tier a partition's records are due in the order they were written, so
when the head record is not due yet nothing behind it is either: the partition is
paused, rewound to that record, and resumed when it falls due. Other partitions
and tiers keep flowing; nothing busy-polls. The offset is committed only after
the record is on ``delivery`` with acks=all.

This stage is a plain confluent-kafka consumer rather than a Faust agent: Faust
has no way for an agent to pause one partition until a time and seek back.

Operators' queue actions (`mailflow queue`, see mailflow/ops/queue.py), read from
``queue.control`` (`ControlView`, read to its end before anything is consumed):

* a flush (of everything, or of one domain) or a bounce request makes each
  matching record written before it due at once (`effective_due`): every paused
  head is looked at again. For a domain or a message, matching records can sit
  behind a head that is not due; `flush_scan` reads the tier partitions this
  replica owns from their committed offset to their end, forwards the matching
  ones, and records how far it read in a ``flushed`` marker, so those records are
  committed past without a second forward when the head reaches them (`covered`).
* ``retry.hold`` is an input too: the deliver stage's held records. They are kept
  in memory and not committed past while held (`lanes`), so they are this stage's
  lag, and forwarded to ``delivery`` once released (`plan_lane`, `released`).
"""

from __future__ import annotations

import heapq
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from mailflow import metrics
from mailflow.config import Settings
from mailflow.kafka_io import producer_config
from mailflow.ops.queue import (
    CONTROL,
    HOLD,
    Controls,
    ControlView,
    LaneEntry,
    covered,
    effective_due,
    key_matches,
    plan_lane,
    record_fields,
    released,
    scan_keys,
)
from schemas.mail import Delivery, parse_deferred, parse_delivery
from schemas.records import ErrorRecord, PoisonPill
from streams.topics import full_name, group_id

STAGE = "retry"
log = logging.getLogger("mailflow.retry")
# Held records kept in memory per ``retry.hold`` partition at most; past it the
# partition is paused (read on after the next release): memory stays bounded and
# the records stay on the topic, as lag.
HOLD_BUFFER = 10_000


def due_at(value: bytes | None) -> float | None:
    """When a retry record falls due, or None if it cannot be read (poison)."""
    try:
        return parse_deferred(value).retry.due
    except PoisonPill:
        return None


def read_deferred(value: bytes | None) -> Delivery | PoisonPill:
    """A retry tier's record (`schemas.mail.parse_deferred`), or why it is poison."""
    try:
        return parse_deferred(value)
    except PoisonPill as pill:
        return pill


class RetryStage:
    def __init__(self, settings: Settings, url: str = "") -> None:
        self.settings = settings
        self.url = url
        self.registry = full_name(settings, "registry")
        self.last_beat = 0.0
        self.tiers = [full_name(settings, f"retry.{i}") for i in range(1, len(settings.retry_schedule) + 1)]
        self.hold_topic = full_name(settings, HOLD)
        self.control_topic = full_name(settings, CONTROL)
        self.topics = [*self.tiers, self.hold_topic]
        self.delivery = full_name(settings, "delivery")
        self.errors = full_name(settings, "errors")
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": group_id(settings, STAGE),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            # As the Faust stages (streams/app.py): a replica killed -9 holds its
            # partitions until its session times out; librdkafka's 45 s default
            # would stop that share of the deferred mail for as long.
            "session.timeout.ms": 15000,
            "heartbeat.interval.ms": 3000,
        })
        self.producer = Producer(producer_config(settings.kafka_bootstrap, **{"linger.ms": 5}))
        self.paused: list[tuple[float, str, int, int]] = []  # heap of (due, topic, partition, offset)
        self.running = True
        self.control = ControlView(settings)
        self.seen_version = -1
        self.scan_due = True  # look for flushes to scan (after an assignment, a failed scan)
        # (flush key, topic, partition) -> ts of the flush this replica scanned it for
        self.marked: dict[tuple[str, str, int], float] = {}
        # ``retry.hold`` partition -> the records read and not committed past
        self.lanes: dict[tuple[str, int], list[LaneEntry]] = {}
        self.lanes_paused: set[tuple[str, int]] = set()

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("retry: assigned %s", [(p.topic, p.partition) for p in partitions])
        self.scan_due = True

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        self.paused = [e for e in self.paused if (e[1], e[2]) not in gone]
        heapq.heapify(self.paused)
        for tp in gone:  # the next owner reads them again from the committed offset
            self.lanes.pop(tp, None)
            self.lanes_paused.discard(tp)

    def produce_acked(self, records: Sequence[tuple[str, bytes | None, bytes | None]]) -> None:
        """Put records on their topics and wait for the broker's ack of every one,
        trying again (all of them) for as long as it takes."""
        while True:
            errors: list[KafkaError] = []

            def delivered(err: KafkaError | None, _msg: Any, errs: list[KafkaError] = errors) -> None:
                if err:
                    errs.append(err)

            for topic, key, value in records:
                self.producer.produce(topic, key=key, value=value, on_delivery=delivered)
            left = self.producer.flush(30)
            if not errors and not left:
                return
            log.warning("retry: could not forward (%s); trying again", errors[0] if errors else "timed out")
            time.sleep(1)

    def forward(self, msg: Any, pill: PoisonPill | None = None) -> None:
        """Put a due record on ``delivery`` as it came (one that is poison, `pill`, on
        ``errors``) and wait for the broker's ack."""
        if pill is None:
            self.produce_acked([(self.delivery, msg.key(), msg.value())])
            return
        self.park(msg, pill, "unreadable retry record")

    def park(self, msg: Any, pill: PoisonPill, what: str) -> None:
        """A poison record onto ``errors`` (state ``poison``, the reason the parser
        gave), acknowledged."""
        value = ErrorRecord(
            stage=STAGE, reason=pill.reason, state="poison", detail=f"{what}: {pill}",
            record=(msg.value() or b"").decode("utf-8", "replace")).to_json()
        self.produce_acked([(self.errors, msg.key(), value)])

    def run(self) -> int:
        while not self.control.ready.wait(10):  # holds made before a restart first
            if not self.running:
                return 0
            log.warning("retry: still reading %s before consuming", self.control_topic)
        self.consumer.subscribe(self.topics, on_assign=self.on_assign, on_revoke=self.on_revoke)
        while self.running:
            self.heartbeat()
            self.apply_controls()
            self.resume_due()
            timeout = 0.5
            if self.paused:
                timeout = max(0.0, min(timeout, self.paused[0][0] - time.time()))
            msg = self.consumer.poll(timeout)
            if msg is None:
                continue
            if (err := msg.error()) is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("retry: %s", err)
                continue
            if msg.topic() == self.hold_topic:
                self.on_held(msg)
                continue
            self.on_deferred(msg)
        self.consumer.close()
        self.producer.flush(10)
        self.control.close()
        return 0

    def on_deferred(self, msg: Any) -> None:
        """One record of a retry tier: forward it if due, else pause its partition."""
        rec = read_deferred(msg.value())
        now = time.time()
        due: float | None = None
        if isinstance(rec, Delivery):
            assert rec.retry.due is not None  # parse_deferred requires it
            domain = (rec.domain or (msg.key() or b"").decode("utf-8", "replace")).lower()
            written = msg.timestamp()[1] / 1000.0
            controls = self.control.controls()
            if covered(controls, msg.topic(), msg.partition(), msg.offset(), domain, rec.id, written):
                # A flush's scan forwarded it already (see `flush_scan`).
                metrics.STAGE_MESSAGES.labels(STAGE, "flushed").inc()
                self.commit_past(msg)
                return
            due = effective_due(controls, rec.retry.due, written, domain, rec.id)
        tp = TopicPartition(msg.topic(), msg.partition(), msg.offset())
        if due is not None and due > now:
            # Not due: everything behind it in this partition is due later still.
            self.consumer.pause([tp])
            self.consumer.seek(tp)
            heapq.heappush(self.paused, (due, msg.topic(), msg.partition(), msg.offset()))
            return
        self.forward(msg, rec if isinstance(rec, PoisonPill) else None)
        metrics.STAGE_MESSAGES.labels(STAGE, "forwarded").inc()
        self.commit_past(msg)

    # ---- operators' actions ----------------------------------------------
    def apply_controls(self) -> None:
        """After a change on ``queue.control``: paused heads looked at again (a flush
        may have made them due), flushes scanned for, held records settled."""
        version = self.control.version
        if version == self.seen_version and not self.scan_due:
            return
        changed = version != self.seen_version
        self.seen_version = version
        controls = self.control.controls()
        if changed and self.paused:
            heads = [TopicPartition(t, p, o) for _, t, p, o in self.paused]
            self.paused = []
            try:
                self.consumer.resume(heads)  # each is read again from its head (sought at the pause)
            except KafkaException as exc:  # revoked meanwhile
                log.info("retry: resume skipped: %s", exc)
        self.scan_due = False
        self.run_scans(controls)
        for tp in list(self.lanes):
            self.settle_lane(tp, controls)

    def run_scans(self, controls: Controls) -> None:
        keys = scan_keys(controls)
        if not keys:
            return
        owned = [(tp.topic, tp.partition) for tp in self.consumer.assignment() if tp.topic in self.tiers]
        todo: dict[tuple[str, int], list[tuple[str, float]]] = {}
        for key, f in keys.items():
            for t, p in owned:
                mark = controls.flushed.get((key, t, p))
                if (mark is not None and mark[0] >= f) or self.marked.get((key, t, p), -1.0) >= f:
                    continue
                todo.setdefault((t, p), []).append((key, f))
        if todo:
            try:
                self.flush_scan(todo)
            except (KafkaException, TimeoutError) as exc:
                log.warning("retry: flush scan failed (%s); trying again", exc)
                self.scan_due = True

    def flush_scan(self, todo: dict[tuple[str, int], list[tuple[str, float]]]) -> None:
        """Forward the records that the flushes in `todo` match, from each partition's
        committed offset to its end, then write how far each scan read (``flushed``).

        The markers are written after the records' acks: a crash in between means the
        scan is done again after the restart (those records reach delivery twice,
        which the deliver stage's ledger makes harmless for what was delivered), never
        that a record matched is skipped without having been forwarded."""
        tps = [TopicPartition(t, p) for t, p in todo]
        starts = {(tp.topic, tp.partition): tp.offset for tp in self.consumer.committed(tps, timeout=10)}
        reader = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap, "enable.auto.commit": False,
                           "group.id": group_id(self.settings, STAGE, f"-scan-{os.getpid()}")})
        try:
            ends = {(t, p): reader.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1] for t, p in todo}
            begin = {k: (o if o >= 0 else OFFSET_BEGINNING) for k, o in starts.items()}
            waiting = {k for k, end in ends.items() if end > max(0, starts[k])}
            reader.assign([TopicPartition(t, p, begin[(t, p)]) for t, p in waiting])
            found: list[tuple[str, bytes | None, bytes | None]] = []
            last = time.monotonic()
            while waiting:
                if time.monotonic() - last > 10:
                    raise TimeoutError(f"no records from {sorted(waiting)} for 10 s")
                m = reader.poll(0.2)
                if m is None or m.error():
                    continue
                last = time.monotonic()
                k = (m.topic(), m.partition())
                offset = m.offset()
                if k not in waiting or offset is None or offset >= ends[k]:
                    continue
                if offset + 1 >= ends[k]:
                    waiting.discard(k)
                fields = record_fields(m.key(), m.value())
                if fields is None:
                    continue  # poison: the head parks it on errors when it reaches it
                domain, rec = fields
                written = m.timestamp()[1] / 1000.0
                if any(key_matches(key, domain, rec.id) and written <= f for key, f in todo[k]):
                    found.append((self.delivery, m.key(), m.value()))
        finally:
            reader.close()
        self.produce_acked(found)
        marks = []
        for (t, p), keys in todo.items():
            for key, f in keys:
                value = orjson.dumps({"action": "flushed", "flush_ts": f, "through": ends[(t, p)] - 1,
                                      "ts": time.time()})
                marks.append((self.control_topic, f"flushed|{key}|{t}|{p}".encode(), value))
        self.produce_acked(marks)
        for _, mark, value in marks:
            self.control.apply(mark.decode(), value)  # in force now, not when the view reads it back
            fkey, mtopic, mpart = mark.decode().split("|", 1)[1].rsplit("|", 2)
            self.marked[(fkey, mtopic, int(mpart))] = orjson.loads(value)["flush_ts"]
        self.seen_version = self.control.version
        if found:
            log.info("retry: a flush sent %d deferred record(s) to delivery now", len(found))
        metrics.STAGE_MESSAGES.labels(STAGE, "forwarded").inc(len(found))

    def on_held(self, msg: Any) -> None:
        """One record of ``retry.hold``: kept while held, forwarded once released."""
        try:
            rec = parse_delivery(msg.value())
        except PoisonPill as pill:
            self.park(msg, pill, "unreadable held record")
            if not self.lanes.get((msg.topic(), msg.partition())):
                self.commit_past(msg)  # else with the held records before it, once they go
            return
        domain = (rec.domain or (msg.key() or b"").decode("utf-8", "replace")).lower()
        tp = (msg.topic(), msg.partition())
        lane = self.lanes.setdefault(tp, [])
        # The record itself stays the Kafka message's bytes: a full buffer holds
        # HOLD_BUFFER records, not twice as many decoded bodies.
        lane.append(LaneEntry(msg.offset(), domain, rec.id, rec.retry, msg))
        self.settle_lane(tp, self.control.controls())
        if len(self.lanes.get(tp, [])) >= HOLD_BUFFER and tp not in self.lanes_paused:
            nxt = TopicPartition(msg.topic(), msg.partition(), msg.offset() + 1)
            self.consumer.pause([nxt])
            self.consumer.seek(nxt)
            self.lanes_paused.add(tp)

    def settle_lane(self, tp: tuple[str, int], controls: Controls) -> None:
        """Forward what is released in one ``retry.hold`` partition, and if anything
        was, put the still-held records behind it again and commit past them all."""
        lane = self.lanes.get(tp)
        if not lane:
            return
        plan = plan_lane(controls, lane)
        if plan is None:
            return
        now = time.time()
        sends: list[tuple[str, bytes | None, bytes]] = []
        for action, entry in plan:
            m = entry.record
            if action == "forward":
                rec = parse_delivery(m.value())  # read once already (`on_held`): it parses
                sends.append((self.delivery, m.key(), rec.with_(retry=released(rec.retry, now)).to_json()))
            else:
                sends.append((self.hold_topic, m.key(), m.value()))
        self.produce_acked(sends)
        freed = sum(1 for action, _ in plan if action == "forward")
        log.info("retry: %d held record(s) of %s[%d] released to delivery", freed, *tp)
        metrics.STAGE_MESSAGES.labels(STAGE, "released").inc(freed)
        self.lanes[tp] = []
        self.commit_past(lane[-1].record)
        if tp in self.lanes_paused:
            self.lanes_paused.discard(tp)
            try:
                self.consumer.resume([TopicPartition(tp[0], tp[1], lane[-1].offset + 1)])
            except KafkaException as exc:
                log.info("retry: resume skipped: %s", exc)

    def commit_past(self, msg: Any) -> bool:
        """Commit past a forwarded record; False if the broker refused the commit.

        A rebalance between the poll and the commit refuses it (ILLEGAL_GENERATION,
        UNKNOWN_MEMBER_ID, REBALANCE_IN_PROGRESS), as does a broker that is away. The
        record is on ``delivery`` already, so nothing is lost: the partition's next
        owner, or this replica's next commit on it, starts at or before it and puts
        it on ``delivery`` again, which the deliver stage's ledger makes harmless. It
        used to end the stage: a 200/s chaos run's retry replica raised here and
        then hung in librdkafka's shutdown, so nothing restarted it and 3,377 records
        waited on their retry tiers for good.
        """
        try:
            self.consumer.commit(offsets=[TopicPartition(msg.topic(), msg.partition(), msg.offset() + 1)],
                                 asynchronous=False)
            return True
        except KafkaException as exc:
            log.warning("retry: commit of %s[%d]@%d refused (%s); the record may be forwarded again",
                        msg.topic(), msg.partition(), msg.offset() + 1, exc)
            return False

    def heartbeat(self) -> None:
        """Say on ``registry`` that this replica is alive, like the Faust stages do."""
        if time.monotonic() - self.last_beat < 5 or not self.consumer.assignment():
            return
        self.last_beat = time.monotonic()
        self.producer.produce(self.registry, key=f"{STAGE}|{self.url}".encode(), value=orjson.dumps(
            {"stage": STAGE, "url": self.url, "pid": os.getpid(), "ts": time.time()}))
        self.producer.poll(0)

    def resume_due(self) -> None:
        now = time.time()
        ready = []
        while self.paused and self.paused[0][0] <= now:
            _, topic, partition, offset = heapq.heappop(self.paused)
            ready.append(TopicPartition(topic, partition, offset))
        if ready:
            try:
                self.consumer.resume(ready)
            except KafkaException as exc:  # revoked meanwhile
                log.info("retry: resume skipped: %s", exc)


def run(settings: Settings, url: str = "") -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stage = RetryStage(settings, url)

    def stop(_sig: int, _frame: object) -> None:
        stage.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"mailflow: stage {STAGE} consuming {len(stage.topics)} tiers "
          f"({', '.join(f'{d:g}s' for d in settings.retry_schedule)})", file=sys.stderr, flush=True)
    try:
        return stage.run()
    except Exception:
        # Exit at once so that the supervisor starts the stage again: an interpreter
        # unwinding with an open librdkafka consumer can hang in its shutdown for good.
        log.exception("retry: stage failed; exiting to be started again")
        logging.shutdown()
        os._exit(70)  # EX_SOFTWARE
