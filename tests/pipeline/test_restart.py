"""A stage started over a backlog with its table to restore from the changelog: it
handles its whole input and its commit reaches the end (streams.app's read-again of
records Faust fetched and dropped right after a recovery)."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

from confluent_kafka import Producer
from harness import Stack, wait_for

from mailflow.ops.lag import measure
from schemas.records import Event

STATES = ("accepted", "admitted", "validated", "scanned", "sent_folder", "delivered")


def produce_events(stack: Stack, first: int, count: int) -> None:
    """Each message's six events, as the stages would send them."""
    p = Producer({"bootstrap.servers": stack.env["MAILFLOW_KAFKA_BOOTSTRAP"], "linger.ms": 20})
    now = time.time()
    for i in range(first, first + count):
        mid = f"m{i:08d}"
        for n, state in enumerate(STATES):
            ev = Event(id=mid, state=state, stage="test", ts=now + n, recipients=["a@x.test"])
            p.produce(f"{stack.prefix}events", key=mid.encode(), value=ev.to_json())
        p.poll(0)
    assert p.flush(30) == 0


def rewind(stack: Stack, stage: str, short: str) -> None:
    from confluent_kafka import TopicPartition

    from streams.topics import group_client, group_id

    c = group_client(stack.settings(), group_id(stack.settings(), stage))
    try:
        topic = f"{stack.prefix}{short}"
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.commit(offsets=[TopicPartition(topic, p, 0) for p in parts], asynchronous=False)
    finally:
        c.close()


def status_lag(stack: Stack) -> int:
    (lag,) = measure(stack.settings(), ["status"])
    assert lag.partitions, "no status input partitions"
    return lag.total


def test_a_stage_restarted_over_a_backlog_commits_to_its_end(kafka: str, work_dir: Path):
    from streams.topics import ensure_topics

    stack = Stack(work_dir, kafka)
    ensure_topics(stack.settings())
    try:
        produce_events(stack, 0, 2000)
        stack.start_stage("status")
        wait_for(lambda: status_lag(stack) == 0, 120, interval=1, what="status to commit its first 12,000 events")
        # Moved to a new machine (no local table: restored from the changelog) and
        # rewound to the start of its input, as an operator rebuilding it would.
        stack.kill("status", signal.SIGTERM)
        shutil.rmtree(stack.data_dir / "stages" / "status")
        rewind(stack, "status", "events")
        produce_events(stack, 2000, 2000)
        stack.start_stage("status")
        # Before the read-again, the commit stopped a few records in for good: Faust
        # handled each partition's first records, dropped the next few dozen it had
        # fetched, and handled the rest.
        wait_for(lambda: status_lag(stack) == 0, 120, interval=1,
                 what="status to commit the backlog after its restart")
    finally:
        stack.stop()
