"""When a scanner is down: `closed` holds mail back until it returns, `open` lets it pass marked."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
from confluent_kafka import Producer
from harness import Stack, free_port, wait_for

from devtools.services import ServiceGroup, prepare_clamd
from mailflow.kafka_io import producer_config
from schemas.records import Message


def produce_outgoing(stack: Stack, n: int, tag: str) -> list[str]:
    p = Producer(producer_config(stack.env["MAILFLOW_KAFKA_BOOTSTRAP"]))
    ids = []
    for i in range(n):
        raw = (f"From: s{i}@mailflow.test\r\nTo: r{i}@remote.test\r\nSubject: {tag} {i}\r\n"
               f"Message-ID: <{tag}{i}@t.test>\r\n\r\nhello {i}\r\n").encode()
        m = Message(id=f"{tag}{i:03d}", sender=f"s{i}@mailflow.test", recipients=[f"r{i}@remote.test"],
                    received_at=time.time(), size=len(raw), body=raw)
        p.produce(f"{stack.prefix}outgoing", key=m.id.encode(), value=m.to_json())
        ids.append(m.id)
    assert p.flush(30) == 0
    return ids


def clean_records(stack: Stack) -> dict[str, dict]:
    return {orjson.loads(v)["id"]: orjson.loads(v) for _, v in stack.read_topic("clean", timeout=3)}


def test_closed_waits_for_clamd_and_passes_nothing_unscanned(kafka: str, work_dir: Path, scanners: None,
                                                            tmp_path: Path):
    port = free_port()
    clamd = ServiceGroup([prepare_clamd(tmp_path / "clamd", port=port)])
    clamd.start()
    stack = Stack(work_dir, kafka, clamd=f"127.0.0.1:{port}", scan_failure="closed")
    try:
        stack.start(["scan"])
        first = produce_outgoing(stack, 20, "before")
        wait_for(lambda: set(first) <= set(clean_records(stack)), 60, what="first batch scanned")
        clamd.stop()
        second = produce_outgoing(stack, 30, "during")
        time.sleep(6)
        assert not set(second) & set(clean_records(stack)), "passed while clamd was down"
        from mailflow.ops.lag import measure

        assert measure(stack.settings(), ["scan"])[0].total >= 1  # waiting shows as lag
        clamd = ServiceGroup([prepare_clamd(tmp_path / "clamd", port=port)])
        clamd.start()
        wait_for(lambda: set(second) <= set(clean_records(stack)), 120, interval=1,
                 what="held mail scanned after clamd returned")
        recs = clean_records(stack)
        assert all(recs[i]["meta"]["scan"]["scanned"] is True for i in first + second)
        assert len([k for k in recs if k.startswith(("before", "during"))]) == 50
    finally:
        stack.stop()
        clamd.stop()


def test_open_passes_mail_marked_unscanned(kafka: str, work_dir: Path, scanners: None):
    stack = Stack(work_dir, kafka, clamd=f"127.0.0.1:{free_port()}", scan_failure="open")
    try:
        stack.start(["scan", "status"])
        ids = produce_outgoing(stack, 5, "open")
        wait_for(lambda: set(ids) <= set(clean_records(stack)), 60, what="passed unscanned")
        recs = clean_records(stack)
        for i in ids:
            assert recs[i]["meta"]["scan"]["scanned"] is False
            assert "clamd" in recs[i]["meta"]["scan"]["reason"]
    finally:
        stack.stop()
