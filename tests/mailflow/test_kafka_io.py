"""mailflow/kafka_io.py: the ingress producer's view of whether Kafka is there at all,
and the one producer configuration."""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

from mailflow.kafka_io import any_broker_answers, bootstrap_addresses, producer_config

ROOT = Path(__file__).resolve().parents[2]
SHARED = os.environ.get("MAILFLOW_TEST_BOOTSTRAP", "127.0.0.1:9092")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: nothing listens there


def test_bootstrap_addresses_reads_every_form_of_the_list():
    assert bootstrap_addresses("127.0.0.1:9092") == [("127.0.0.1", 9092)]
    assert bootstrap_addresses(" a:1, PLAINTEXT://b:2 ,[::1]:3,") == [("a", 1), ("b", 2), ("::1", 3)]


def test_no_broker_listening_is_an_outage_known_within_a_second():
    started = time.monotonic()
    assert not any_broker_answers(f"127.0.0.1:{_closed_port()},127.0.0.1:{_closed_port()}")
    assert time.monotonic() - started < 1.5


def test_one_live_broker_among_dead_addresses_answers():
    # A cluster with nodes down: the live one is found whatever the order.
    dead = f"127.0.0.1:{_closed_port()}"
    assert any_broker_answers(f"{dead},{SHARED}")
    assert any_broker_answers(f"{SHARED},{dead}", tries=1)


def test_caught_up_reads_one_partition_up_to_its_end_offset():
    import asyncio
    import uuid

    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from mailflow.api.auth import SyncReader
    from mailflow.kafka_ready import wait_until_served

    topic = f"mailflow-test-caught-up-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": SHARED})
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(30)
    wait_until_served(SHARED, [topic], 30)
    p = Producer({"bootstrap.servers": SHARED, "acks": "all"})
    for i in range(3):
        p.produce(topic, key=b"k", value=f'{{"n": {i}}}'.encode(), partition=1)
    assert p.flush(30) == 0
    reader = SyncReader(SHARED, [topic])
    try:
        assert asyncio.run(reader.caught_up(topic, 1, within=30))
        assert reader.positions[(topic, 1)] == 3 and reader.values[topic]["k"] == {"n": 2}
        assert reader._end_offset(topic, 0, 5) == 0
    finally:
        reader.close()


def test_producer_config_is_acks_all_idempotent_murmur2() -> None:
    c = producer_config("h:1")
    assert c == {"bootstrap.servers": "h:1", "acks": "all", "enable.idempotence": True,
                 "partitioner": "murmur2_random"}
    assert producer_config("h:1", **{"linger.ms": 5})["linger.ms"] == 5


def test_no_runtime_module_writes_its_own_producer_configuration() -> None:
    # The stages, the API and the operator tools take producer_config, so that none
    # lacks acks=all or the partitioner the others use.
    sources = [*ROOT.glob("agents/*.py"), *ROOT.glob("streams/*.py"), *ROOT.glob("mailflow/**/*.py")]
    own = [str(p.relative_to(ROOT)) for p in sources
           if p.name != "kafka_io.py" and re.search(r'"acks":\s*"all"', p.read_text())]
    assert not own
