"""Retry stage.

Input: ``retry.1`` … ``retry.N`` (key: recipient domain), each tier with one fixed
delay (``RETRY_SCHEDULE``); every record carries ``meta.due``. Output:
``delivery`` (same key) once the record is due.

Within one tier a partition's records are due in the order they were written, so
when the head record is not due yet nothing behind it is either: the partition is
paused, rewound to that record, and resumed when it falls due. Other partitions
and tiers keep flowing; nothing busy-polls. The offset is committed only after
the record is on ``delivery`` with acks=all.

This stage is a plain confluent-kafka consumer rather than a Faust agent: Faust
has no way for an agent to pause one partition until a time and seek back.
"""

from __future__ import annotations

import heapq
import logging
import os
import signal
import sys
import time
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from mailflow import metrics
from mailflow.config import Settings
from schemas.records import ErrorRecord
from streams.topics import full_name

STAGE = "retry"
log = logging.getLogger("mailflow.retry")


def due_at(value: bytes | None) -> float | None:
    """When a retry record falls due, or None if it cannot be read (poison)."""
    try:
        doc = orjson.loads(value or b"")
        return float(doc["meta"]["due"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class RetryStage:
    def __init__(self, settings: Settings, url: str = "") -> None:
        self.settings = settings
        self.url = url
        self.registry = full_name(settings, "registry")
        self.last_beat = 0.0
        self.topics = [full_name(settings, f"retry.{i}") for i in range(1, len(settings.retry_schedule) + 1)]
        self.delivery = full_name(settings, "delivery")
        self.errors = full_name(settings, "errors")
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}{STAGE}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
        })
        self.producer = Producer({
            "bootstrap.servers": settings.kafka_bootstrap, "acks": "all",
            "enable.idempotence": True, "linger.ms": 5, "partitioner": "murmur2_random",
        })
        self.paused: list[tuple[float, str, int, int]] = []  # heap of (due, topic, partition, offset)
        self.running = True

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("retry: assigned %s", [(p.topic, p.partition) for p in partitions])

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        self.paused = [e for e in self.paused if (e[1], e[2]) not in gone]
        heapq.heapify(self.paused)

    def forward(self, msg: Any) -> None:
        """Put a due record on ``delivery`` and wait for the broker's ack."""
        result: dict[str, Any] = {}

        def done(err: KafkaError | None, _m: Any) -> None:
            result["err"] = err

        target = self.delivery if due_at(msg.value()) is not None else self.errors
        value = msg.value() if target == self.delivery else ErrorRecord(
            stage=STAGE, reason="not_json", state="poison", detail="unreadable retry record",
            record=(msg.value() or b"").decode("utf-8", "replace")).to_json()
        while True:
            self.producer.produce(target, key=msg.key(), value=value, on_delivery=done)
            self.producer.flush(30)
            if result.get("err") is None and "err" in result:
                return
            log.warning("retry: could not forward (%s); trying again", result.get("err"))
            result.clear()
            time.sleep(1)

    def run(self) -> int:
        self.consumer.subscribe(self.topics, on_assign=self.on_assign, on_revoke=self.on_revoke)
        while self.running:
            self.heartbeat()
            self.resume_due()
            timeout = 0.5
            if self.paused:
                timeout = max(0.0, min(timeout, self.paused[0][0] - time.time()))
            msg = self.consumer.poll(timeout)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("retry: %s", msg.error())
                continue
            due = due_at(msg.value())
            now = time.time()
            tp = TopicPartition(msg.topic(), msg.partition(), msg.offset())
            if due is not None and due > now:
                # Not due: everything behind it in this partition is due later still.
                self.consumer.pause([tp])
                self.consumer.seek(tp)
                heapq.heappush(self.paused, (due, msg.topic(), msg.partition(), msg.offset()))
                continue
            self.forward(msg)
            metrics.STAGE_MESSAGES.labels(STAGE, "forwarded").inc()
            self.commit_past(msg)
        self.consumer.close()
        self.producer.flush(10)
        return 0

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
