"""In-flow control: the wait rule, the backlog read from a real broker, and a
submission held back while the pipeline is behind."""

import asyncio
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition

from mailflow.api.inflow import BacklogReader, InFlow, must_wait
from mailflow.config import Settings
from streams.topics import ensure_topics, full_name, group_id


def test_waits_only_above_the_mark_and_never_past_the_delay():
    assert must_wait(backlog=101, limit=100, waited=0.0, max_delay=1.0)
    assert not must_wait(backlog=100, limit=100, waited=0.0, max_delay=1.0)
    assert not must_wait(backlog=10_000, limit=100, waited=1.0, max_delay=1.0)
    assert not must_wait(backlog=10_000, limit=0, waited=0.0, max_delay=1.0)  # off


def _settings(kafka: str, **kw: object) -> Settings:
    return Settings(kafka_bootstrap=kafka, topic_prefix=f"inflow{uuid.uuid4().hex[:6]}.", partitions=2, **kw)


def _commit(settings: Settings, stage: str, topic: str, offsets: dict[int, int]) -> None:
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                  "group.id": group_id(settings, stage), "enable.auto.commit": False})
    try:
        c.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False)
    finally:
        c.close()


def test_backlog_is_what_the_pipeline_groups_have_not_committed(kafka: str):
    s = _settings(kafka)
    ensure_topics(s)
    admitted, local = full_name(s, "admitted"), full_name(s, "local")
    p = Producer({"bootstrap.servers": kafka})
    for i in range(6):
        p.produce(admitted, value=b"x", partition=i % 2)
    for _ in range(4):
        p.produce(local, value=b"x", partition=0)
    p.produce(full_name(s, "events"), value=b"x", partition=0)  # status: not pipeline
    assert p.flush(10) == 0

    async def read() -> int:
        reader = BacklogReader(s)
        try:
            return await reader.read()
        finally:
            await reader.close()

    # No group has committed yet: all of it waits on stages that never ran (as
    # `mailflow lag` counts it); the status stage's events do not count.
    assert asyncio.run(read()) == 10
    _commit(s, "validate", admitted, {0: 1, 1: 0})  # 2 + 3 left
    _commit(s, "store", local, {0: 4, 1: 0})  # all done
    assert asyncio.run(read()) == 5


def test_a_submission_waits_for_the_backlog_at_most_the_delay(kafka: str):
    async def scenario() -> tuple[float, float, float]:
        flow = InFlow(_settings(kafka, in_flow_backlog=10, in_flow_delay=2.0))
        flow.backlog = 50  # as the sampler would have seen it; the sampler is not started
        held = time.monotonic()
        await flow.admit()
        held = time.monotonic() - held

        async def drain() -> None:
            await asyncio.sleep(0.2)
            flow.backlog = 3

        released = time.monotonic()
        await asyncio.gather(flow.admit(), drain())
        released = time.monotonic() - released
        flow.backlog = 3
        free = time.monotonic()
        await flow.admit()
        return held, released, time.monotonic() - free

    held, released, free = asyncio.run(scenario())
    assert 2.0 <= held < 3.5  # behind the whole time: waits the delay, then goes anyway
    assert 0.2 <= released < 1.5  # let through once the backlog fell, well before the delay
    assert free < 0.5
