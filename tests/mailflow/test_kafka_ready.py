"""The first reads and writes of a process, against a broker that has only just
become ready: they wait until it serves them instead of failing
(``NOT_LEADER_FOR_PARTITION`` from the first `mailflow up`'s credentials read).

A broker of our own on free ports, started and SIGKILLed/restarted here, since the
race is only there in the first moments after a broker (re)starts.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import orjson
import pytest
from harness import Broker, free_ports

from mailflow.config import Settings
from mailflow.kafka_ready import BrokerNotReady, is_transient, wait_until_served


def test_transient_errors_are_told_from_the_others() -> None:
    from confluent_kafka import KafkaError, KafkaException

    for code in (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                 KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._TIMED_OUT, KafkaError._TRANSPORT,
                 KafkaError._DESTROY_BROKER):
        assert is_transient(KafkaException(KafkaError(code)))
    assert not is_transient(KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)))
    assert not is_transient(KafkaException(KafkaError(KafkaError.INVALID_REQUEST)))
    assert not is_transient(ValueError("no"))


def test_a_topic_that_never_comes_is_named_after_the_bounded_wait(kafka: str) -> None:
    missing = f"mailflow-test-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(BrokerNotReady, match=missing):
        wait_until_served(kafka, [missing], timeout=1.5)


def _free_pair() -> int:
    """A port whose next port is free too (the broker's controller), below the
    ephemeral range: the broker is started again on it."""
    return free_ports(2)


def _first_reads(settings: Settings, registry_entry: bytes | None) -> None:
    """What `mailflow up`, the API and a stage do first on a broker: topics, the demo
    credentials (read_all and writes), the registry read, the API's auth reader and
    a stage's first group offsets. Each must succeed, not raise."""
    from mailflow.api.auth import SyncReader, ensure_demo_credentials, parse_credential, read_all
    from mailflow.kafka_io import read_to_end
    from streams.topics import full_name, init_group_offsets

    key, token = ensure_demo_credentials(settings)
    known = read_all(settings)
    for cred in (key, token):
        parsed = parse_credential(cred)
        assert parsed is not None and parsed[1] in known
    registry = full_name(settings, "registry")
    entries = read_to_end(settings.kafka_bootstrap, registry, idle_timeout=5)
    if registry_entry is not None:
        assert (b"deliver|test", registry_entry) in entries
    auth = full_name(settings, "auth")
    reader = SyncReader(settings.kafka_bootstrap, [auth, registry])
    try:
        assert reader.sync(auth, timeout=30)
        assert parse_credential(key)[1] in reader.values[auth]  # type: ignore[index]
    finally:
        reader.close()
    group = f"{settings.topic_prefix}deliver"
    init_group_offsets(settings, group, [full_name(settings, "delivery")])


def _write_registry(settings: Settings, value: bytes) -> None:
    from confluent_kafka import Producer

    from streams.topics import full_name

    p = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all"})
    p.produce(full_name(settings, "registry"), key=b"deliver|test", value=value)
    assert p.flush(30) == 0


def test_first_reads_right_after_the_broker_becomes_ready(tmp_path: Path) -> None:
    port = _free_pair()
    broker = Broker(tmp_path, port, port + 1)
    base = Settings(kafka_bootstrap=broker.bootstrap, partitions=2)

    def fresh(name: str) -> Settings:
        data = tmp_path / name
        data.mkdir()
        return dataclasses.replace(base, topic_prefix=f"{name}.", data_dir=data)

    kept = fresh("kept")  # topics that exist across the restarts
    entry = orjson.dumps({"stage": "deliver", "url": "http://127.0.0.1:1"})
    broker.start()  # returns the moment the broker answers metadata
    try:
        runs = 0
        for restart in range(3):
            if restart:
                broker.stop(kill=True)  # a crash: leaders are elected again on start
                broker.start()
            # At once, before anything else has warmed the broker up.
            _first_reads(kept, entry if restart else None)
            if not restart:
                _write_registry(kept, entry)
            for i in range(3):  # topic creation and leader election each time
                _first_reads(fresh(f"r{restart}n{i}"), None)
                runs += 1
        assert runs == 9
    finally:
        broker.stop(kill=True)
