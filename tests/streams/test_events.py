"""streams/events.py: a turn's status events sent as one record per partition."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from mailflow.kafka_io import partition_of
from schemas.records import Event, parse_events
from streams.events import EventBatcher


class FakeProduce:
    """`produce(topic, key, value, partition)` whose futures the test settles."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, int | None]] = []
        self.futures: list[asyncio.Future[tuple[int, int]]] = []

    def __call__(self, topic: str, key: bytes | None, value: bytes, partition: int | None
                 ) -> asyncio.Future[tuple[int, int]]:
        self.sent.append((topic, key, value, partition))
        fut: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        return fut


def ev(msg_id: str, state: str = "accepted") -> bytes:
    return Event(id=msg_id, state=state, stage="t", ts=1.0, recipients=["x@one.test"]).to_json()


def ids_in(partition: int, n: int, partitions: int = 4) -> list[str]:
    """`n` message ids whose records go to `partition`."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        mid = f"m{i}"
        if partition_of(mid.encode(), partitions) == partition:
            out.append(mid)
        i += 1
    return out


async def test_a_turns_events_for_one_partition_are_one_record_and_share_its_ack() -> None:
    produce = FakeProduce()
    b = EventBatcher(produce, "events")
    b.partitions = 4
    ids = ids_in(2, 3)
    keys = [ids[0], ids[1], ids[0], ids[2]]
    values = [ev(ids[0]), ev(ids[1]), ev(ids[0], "validated"), ev(ids[2])]
    futs = [b.add(k.encode(), v) for k, v in zip(keys, values, strict=True)]
    assert produce.sent == []  # nothing until the turn ends
    await asyncio.sleep(0)
    (topic, key, value, partition), = produce.sent
    assert (topic, key, partition) == ("events", None, 2)
    assert [e.to_json() for e in parse_events(value)] == values  # in the order made
    produce.futures[0].set_result((2, 41))
    assert [await f for f in futs] == [(2, 41)] * 4


async def test_one_event_alone_in_its_partition_is_a_keyed_record_as_before() -> None:
    produce = FakeProduce()
    b = EventBatcher(produce, "events")
    b.partitions = 4
    a, = ids_in(0, 1)
    c, d = ids_in(3, 2)
    b.add(a.encode(), ev(a))
    b.add(c.encode(), ev(c))
    b.add(d.encode(), ev(d))
    await asyncio.sleep(0)
    by_partition = {p: (k, v) for _, k, v, p in produce.sent}
    assert set(by_partition) == {0, 3}
    assert by_partition[0] == (a.encode(), ev(a))
    assert by_partition[3][0] is None and [e.id for e in parse_events(by_partition[3][1])] == [c, d]


async def test_until_the_partition_count_is_known_each_event_is_its_own_keyed_record() -> None:
    produce = FakeProduce()
    b = EventBatcher(produce, "events")
    b.add(b"m1", ev("m1"))
    b.add(b"m2", ev("m2"))
    assert produce.sent == [("events", b"m1", ev("m1"), None), ("events", b"m2", ev("m2"), None)]


async def test_a_full_batch_goes_at_once_and_the_turn_starts_another_in_order() -> None:
    produce = FakeProduce()
    b = EventBatcher(produce, "events", max_events=2)
    b.partitions = 4
    ids = ids_in(1, 5)
    futs = [b.add(i.encode(), ev(i)) for i in ids]
    assert len(produce.sent) == 2  # two full records, the fifth waits for the turn's end
    await asyncio.sleep(0)
    assert [[e.id for e in parse_events(v)] for _, _, v, _ in produce.sent] == [ids[:2], ids[2:4], ids[4:]]
    assert produce.sent[2][1] == ids[4].encode()  # alone: keyed
    for n, f in enumerate(produce.futures):
        f.set_result((1, n))
    assert [await f for f in futs] == [(1, 0), (1, 0), (1, 1), (1, 1), (1, 2)]


async def test_a_refused_record_fails_every_event_in_it() -> None:
    produce = FakeProduce()
    b = EventBatcher(produce, "events")
    b.partitions = 4
    ids = ids_in(0, 2)
    futs = [b.add(i.encode(), ev(i)) for i in ids]
    await asyncio.sleep(0)
    produce.futures[0].set_exception(OSError("broker went away"))
    for f in futs:
        with pytest.raises(OSError):
            await f


async def test_batches_land_where_keyed_records_would_and_read_back(kafka: str) -> None:
    # The batch's partition must be the one librdkafka's murmur2_random gives the id:
    # the status table keeps a message where its id's records are.
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    from mailflow.kafka_io import AsyncProducer
    from mailflow.kafka_ready import wait_until_served

    topic = f"mailflow-test-events-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka})
    admin.create_topics([NewTopic(topic, 5, 1)])[topic].result(30)
    wait_until_served(kafka, [topic], 30)
    producer = AsyncProducer(kafka)
    consumer: Any = None
    try:
        keyed = {f"k{i}": producer.produce(topic, f"k{i}".encode(), b"{}") for i in range(40)}
        placed = {k: (await f)[0] for k, f in keyed.items()}
        assert placed == {k: partition_of(k.encode(), 5) for k in keyed}
        n = await asyncio.get_running_loop().run_in_executor(None, producer.partition_count, topic)
        assert n == 5
        b = EventBatcher(lambda t, k, v, p: producer.produce(t, k, v, partition=p), topic)
        b.partitions = n
        ids = [f"msg-{i}" for i in range(30)]
        acks = await asyncio.gather(*(b.add(i.encode(), ev(i)) for i in ids))
        assert all(p == partition_of(i.encode(), 5) for i, (p, _) in zip(ids, acks, strict=True))
        consumer = Consumer({"bootstrap.servers": kafka, "group.id": topic, "enable.auto.commit": False})
        consumer.assign([TopicPartition(topic, p, 0) for p in range(5)])
        seen: dict[str, int] = {}
        for _ in range(50):
            for m in consumer.consume(100, 0.5):
                if m.error() is None and m.value() != b"{}":
                    seen.update({e.id: m.partition() for e in parse_events(m.value())})
            if len(seen) == len(ids):
                break
        assert seen == {i: partition_of(i.encode(), 5) for i in ids}
    finally:
        if consumer is not None:
            consumer.close()
        producer.close()
        admin.delete_topics([topic])[topic].result(30)
