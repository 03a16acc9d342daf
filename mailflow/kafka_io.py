"""Kafka through confluent-kafka: the configuration every producer of mailflow's
records uses (`producer_config`), that producer awaited from asyncio (the ingress),
a reader that follows compacted topics into dicts (credentials, domains,
suppressions, the registry...), and `read_to_end` for the command-line tools.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from typing import Any

import orjson
from aiokafka.partitioner import murmur2
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from mailflow.kafka_ready import wait_for_partitions

log = logging.getLogger("mailflow.kafka")


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """The confluent-kafka configuration of a producer of mailflow's records, with
    `overrides` (keys as librdkafka spells them: ``producer_config(b, **{"linger.ms": 5})``).

    acks=all and idempotent: a record counts as written once every in-sync replica
    has it, and a retried send is never written twice. Keys are partitioned with
    murmur2 like the Java client and aiokafka (the Faust stages), so one key maps to
    one partition whoever produces it.
    """
    return {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "partitioner": "murmur2_random",
        **overrides,
    }


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of a keyed record among `partitions` as `producer_config`'s
    producers place it (murmur2, as librdkafka's ``murmur2_random``, the Java client
    and aiokafka hash a non-empty key)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def coordinates(msg: Message) -> tuple[str, int, int]:
    """A consumed record's topic, partition and offset. confluent-kafka types each
    optional; they are unset only on error events, which every caller skips first."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None, msg.error()
    return topic, partition, offset


class BrokerUnavailable(Exception):
    pass


def bootstrap_addresses(bootstrap: str) -> list[tuple[str, int]]:
    """(host, port) of each address in a ``bootstrap.servers`` list
    (``host:port,host:port``; a ``PLAINTEXT://`` scheme and ``[v6]`` brackets allowed)."""
    out = []
    for part in bootstrap.split(","):
        part = part.strip().rpartition("://")[2]
        if not part:
            continue
        host, _, port = part.rpartition(":")
        out.append((host.strip("[]") or "127.0.0.1", int(port)))
    return out


def _accepts(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def any_broker_answers(bootstrap: str, tries: int = 3, timeout: float = 3.0) -> bool:
    """Whether some broker of `bootstrap` answers a metadata request, asked afresh.

    Each try connects to every bootstrap address (a refused connection is a node that
    is down, known at once), then asks the nodes that accepted, from a client of its
    own: not the asking producer's, whose metadata request librdkafka may queue for
    the node that just died, and whose poll thread must keep serving delivery reports
    meanwhile. None accepting twice in a row, half a second apart, is an outage (the
    only broker gone: say so in a second); nodes that accept but do not answer within
    `timeout`, `tries` times, are one too (a broker shutting down, or hung). 3 s a
    try: a live broker on a saturated 2-core machine can take over 1 s to answer.
    """
    from mailflow.kafka_ready import is_ready

    addresses = bootstrap_addresses(bootstrap)
    refused = 0
    for _ in range(tries):
        up = [f"{h}:{p}" for h, p in addresses if _accepts(h, p, min(1.0, timeout))]
        if up and is_ready(",".join(up), timeout):
            return True
        if not up:
            refused += 1
            if refused >= 2:
                return False
            time.sleep(0.5)
    return False


class AsyncProducer:
    """Idempotent, acks=all producer (`producer_config`); `send` returns once the
    broker has the record."""

    def __init__(self, bootstrap: str, timeout_ms: int = 10000, purge_when_down: bool = False,
                 **extra: Any) -> None:
        """`timeout_ms`: how long a record may wait for its partition's leader (on a
        cluster, a new one after a broker died: 30 s rides the failover).
        `purge_when_down`: once no broker answers at all, fail the records still
        queued (never sent, so nothing was accepted) at once instead of after
        `timeout_ms`: the ingress's 503 comes in a second, not at the timeout."""
        self._bootstrap = bootstrap
        self._producer = Producer(producer_config(bootstrap, **{
            "linger.ms": 2,
            "message.timeout.ms": timeout_ms,
            "message.max.bytes": 2 * 1024 * 1024,
            "error_cb": self._on_error,
            **extra,
        }))
        self._down = False
        self._suspect = threading.Event()  # a connection failed: is any broker left?
        self._purge = purge_when_down
        self._running = True
        # Delivery reports settled since the last hand-over, per event loop: handed to
        # each loop in one call per poll, not one wake-up (a pipe write) per record.
        self._settled: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, bool]]] = {}
        self._settled_lock = threading.Lock()
        self._thread = threading.Thread(target=self._poll, name="kafka-producer", daemon=True)
        self._thread.start()
        self._watcher = threading.Thread(target=self._watch, name="kafka-producer-watch", daemon=True)
        self._watcher.start()

    @property
    def broker_down(self) -> bool:
        return self._down

    def _on_error(self, err: KafkaError) -> None:
        # Neither a failed connection (_TRANSPORT) nor librdkafka's "all brokers down"
        # is taken at its word: on a cluster both come when one node dies (the second
        # when the producer's only connections were to that node), and flagging them
        # would make the ingress refuse every submission whenever one node dies. The
        # watch thread asks whether any broker answers, and only then is the broker down.
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self._suspect.set()
        log.warning("kafka producer: %s", err)

    def _watch(self) -> None:
        """Decide "down" and "up again" off the poll thread.

        The probe is `any_broker_answers`, from a client of its own, here: in the
        poll thread, through the producer's own handle, no delivery report would be
        served for its up to 6 s, and on a cluster that handle can fail the probe with
        two of three nodes up (its requests queued for the node that died).
        """
        while self._running:
            if self._down:
                if any_broker_answers(self._bootstrap, tries=1, timeout=1.0):
                    log.warning("kafka producer: a broker answers again")
                    self._down = False
                else:
                    time.sleep(1.0)
                continue
            if not self._suspect.wait(0.5):
                continue
            self._suspect.clear()
            if any_broker_answers(self._bootstrap):
                continue
            log.warning("kafka producer: no broker answers; refusing until one does")
            self._down = True
            if self._purge:
                # Queued records never reached a broker: failing them is safe (the
                # caller answers 503, nothing accepted). Those in flight may have
                # been written, so they wait for their acknowledgement or timeout.
                self._producer.purge(in_queue=True, in_flight=False, blocking=False)

    def _poll(self) -> None:
        while self._running:
            self._producer.poll(0.05)
            self._hand_over()

    def _settle(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], value: Any,
                ok: bool) -> None:
        with self._settled_lock:
            self._settled.setdefault(loop, []).append((fut, value, ok))

    def _hand_over(self) -> None:
        with self._settled_lock:
            settled, self._settled = self._settled, {}
        for loop, batch in settled.items():
            try:
                loop.call_soon_threadsafe(_settle_all, batch)
            except RuntimeError:  # that loop is closed: nobody waits on these any more
                pass

    def produce(self, topic: str, key: bytes | None, value: bytes,
                partition: int | None = None) -> asyncio.Future[tuple[int, int]]:
        """Queue a record; the future resolves to (partition, offset) once acknowledged.

        `partition` overrides the key's partition (a table's changelog record goes
        to the partition of the input record that wrote it).

        Must be called from the event loop's thread. Lets a caller queue several
        records and wait for them together.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, int]] = loop.create_future()
        if self._down:
            fut.set_exception(BrokerUnavailable("the Kafka broker is not reachable"))
            return fut

        def done(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                self._settle(loop, fut, BrokerUnavailable(str(err)), False)
            else:
                self._down = False
                self._settle(loop, fut, (msg.partition(), msg.offset()), True)

        try:
            if partition is None:
                self._producer.produce(topic, value=value, key=key, on_delivery=done)
            else:
                self._producer.produce(topic, value=value, key=key, partition=partition,
                                       on_delivery=done)
        except BufferError:
            fut.set_exception(BrokerUnavailable("the producer queue is full"))
        except KafkaException as exc:
            fut.set_exception(BrokerUnavailable(str(exc)))
        return fut

    async def send(self, topic: str, key: bytes | None, value: bytes) -> tuple[int, int]:
        """(partition, offset) once acknowledged; BrokerUnavailable otherwise."""
        return await self.produce(topic, key, value)

    def partition_count(self, topic: str, timeout: float = 5.0) -> int | None:
        """How many partitions `topic` has, from the broker's metadata; None if the
        broker does not say in `timeout` or the topic does not exist. Blocks: call it
        from a thread."""
        try:
            meta = self._producer.list_topics(topic, timeout=timeout)
        except KafkaException:
            return None
        t = meta.topics.get(topic)
        if t is None or t.error is not None or not t.partitions:
            return None
        return len(t.partitions)

    def probe(self, timeout: float = 1.0) -> bool:
        """Whether a broker answers now (`any_broker_answers`, one try)."""
        return any_broker_answers(self._bootstrap, tries=1, timeout=timeout)

    def close(self, timeout: float = 10.0) -> None:
        self._producer.flush(timeout)
        self._running = False
        self._thread.join(2)
        self._watcher.join(3)
        self._hand_over()  # reports served by flush() in this thread


def _settle_all(batch: list[tuple[asyncio.Future[Any], Any, bool]]) -> None:
    for fut, value, ok in batch:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


class CompactedReader:
    """Follows compacted topics from the beginning into dicts (key -> latest JSON value)."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.values: dict[str, dict[str, Any]] = {t: {} for t in topics}
        self.positions: dict[tuple[str, int], int] = {}  # next offset to read, per partition
        self.partitions: dict[str, int] = {}  # partition count per topic, once assigned
        self._consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": f"mailflow-reader-{uuid.uuid4().hex[:8]}",  # never commits
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "topic.metadata.refresh.interval.ms": 5000,
        })
        self._topics = topics
        self._running = True
        self._thread = threading.Thread(target=self._run, name="kafka-reader", daemon=True)
        self._thread.start()

    def _assign(self) -> bool:
        # Every topic, each partition led: a reader that assigned the topics present at
        # the first look would never read one created a moment later.
        try:
            marks = wait_for_partitions(self._consumer, self._topics, timeout=5)
        except Exception as exc:  # BrokerNotReady, or the broker still coming up
            log.debug("reader not assigned yet: %s", exc)
            return False
        self._consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in marks])
        self.partitions = {t: sum(1 for tt, _ in marks if tt == t) for t in self._topics}
        return True

    def _run(self) -> None:
        while self._running and not self._assign():
            time.sleep(1)
        while self._running:
            msg = self._consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            topic, partition, offset = coordinates(msg)
            self.positions[(topic, partition)] = offset + 1
            table = self.values[topic]
            key = (msg.key() or b"").decode("utf-8", "replace")
            value = msg.value()
            if value is None:
                table.pop(key, None)
                continue
            try:
                table[key] = orjson.loads(value)
            except orjson.JSONDecodeError:
                continue

    def close(self) -> None:
        self._running = False
        self._thread.join(2)
        self._consumer.close()


def read_to_end(bootstrap: str, topic: str, idle_timeout: float = 10.0) -> list[tuple[bytes | None, bytes | None]]:
    """Every (key, value) on `topic` up to its end offsets when called, from the start.

    Gives up on a partition that stays silent for `idle_timeout` seconds (a broker
    that went away). Values are None for tombstones.
    """
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"mailflow-read-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False})
    try:
        marks = wait_for_partitions(c, [topic], 60.0)  # a broker just started: bounded wait
        parts = [p for _t, p in marks]
        ends = {p: marks[(topic, p)][1] for p in parts}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        remaining = {p for p, e in ends.items() if e > 0}
        out: list[tuple[bytes | None, bytes | None]] = []
        last_seen = time.monotonic()
        while remaining and time.monotonic() - last_seen < idle_timeout:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            last_seen = time.monotonic()
            out.append((m.key(), m.value()))
            _topic, partition, offset = coordinates(m)
            if offset + 1 >= ends[partition]:
                remaining.discard(partition)
        return out
    finally:
        c.close()
