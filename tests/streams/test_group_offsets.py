"""A stage's group starts at the beginning of its input: offsets committed up front."""

import uuid

from confluent_kafka import Consumer, Producer, TopicPartition

from mailflow.config import Settings
from streams.topics import ensure_topics, full_name, init_group_offsets


def test_a_new_group_gets_the_log_start_committed_once(kafka: str):
    s = Settings(kafka_bootstrap=kafka, topic_prefix=f"grp{uuid.uuid4().hex[:6]}.", partitions=2)
    ensure_topics(s)
    topic = full_name(s, "delivery")
    p = Producer({"bootstrap.servers": kafka})
    for i in range(4):
        p.produce(topic, value=b"x", partition=i % 2)
    assert p.flush(10) == 0
    group = f"{s.topic_prefix}deliver"
    assert init_group_offsets(s, group, [topic]) == 2
    c = Consumer({"bootstrap.servers": kafka, "group.id": group, "enable.auto.commit": False})
    try:
        got = c.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=10)
    finally:
        c.close()
    assert [tp.offset for tp in got] == [0, 0]  # the beginning, not the 2 records' end
    assert init_group_offsets(s, group, [topic]) == 0  # already set: left alone
