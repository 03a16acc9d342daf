"""The rate limiter's counts survive a kill -9 and a lost disk: its windowed table is
restored from the changelog records the stage's own producer wrote
(`streams.runtime._AckedTable`), on the real broker; and a message read twice by the
restored replica (Faust's recovery resumes the input before it seeks it to the
commit) keeps its first decision (`agents.ratelimit.Decisions`)."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import orjson
from confluent_kafka import Producer
from harness import Stack, wait_for

from mailflow.kafka_io import producer_config
from schemas.submission import make_submission

SENDER = "counted@mailflow.test"
RAW = b"From: counted@mailflow.test\r\nTo: x@remote.test\r\nSubject: n\r\n\r\nbody\r\n"


def submit(stack: Stack, n: int) -> list[str]:
    p = Producer(producer_config(stack.env["MAILFLOW_KAFKA_BOOTSTRAP"]))
    ids = []
    for _ in range(n):
        msg_id, value = make_submission(RAW, sender=SENDER, recipients=["x@remote.test"])
        p.produce(f"{stack.prefix}submissions", key=SENDER.encode(), value=value)
        ids.append(msg_id)
    assert p.flush(10) == 0
    return ids


def ids_on(stack: Stack, topic: str) -> list[str]:
    out = []
    for _, value in stack.read_topic(topic, timeout=3):
        obj = orjson.loads(value)
        out.append(obj.get("id") or "")
    return out


def test_counts_come_back_from_the_changelog_after_a_kill_and_a_lost_disk(kafka: str, work_dir: Path):
    from streams.topics import ensure_topics

    # Three a month: a window edge inside the test run is one chance in 40,000.
    stack = Stack(work_dir, kafka, rate_limit="3/30d")
    ensure_topics(stack.settings())
    try:
        stack.start_stage("ratelimit")
        first = submit(stack, 2)
        wait_for(lambda: sorted(ids_on(stack, "admitted")) == sorted(first), 120, interval=0.5,
                 what="the first two to be admitted")
        # Killed, and its local table gone with the machine: only the changelog remains.
        stack.kill("ratelimit", signal.SIGKILL)
        shutil.rmtree(stack.data_dir / "stages" / "ratelimit")
        stack.start_stage("ratelimit")
        third, fourth = submit(stack, 2)

        def errors() -> list[dict]:
            return [orjson.loads(v) for _, v in stack.read_topic("errors", timeout=3)]

        wait_for(lambda: any(e.get("id") == fourth for e in errors()), 120, interval=0.5,
                 what="the fourth message to be parked")
        # Each message decided once, however often it was read (a second copy of a
        # record downstream is at-least-once; a second decision would be two states).
        assert set(ids_on(stack, "admitted")) == {*first, third}
        parked = [e for e in errors() if e.get("stage") == "ratelimit"]
        assert {e["id"] for e in parked} == {fourth} and {e["state"] for e in parked} == {"rate_limited"}
    finally:
        stack.stop()
