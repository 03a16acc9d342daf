"""The operators' view: lag per stage (command and metric) and /metrics on every process."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from harness import ROOT, ScriptedPeer, Stack, free_port, http, wait_for
from prometheus_client.parser import text_string_to_metric_families

from mailflow.kafka_io import producer_config
from schemas.records import Message


@pytest.fixture(scope="module")
def peer() -> Iterator[ScriptedPeer]:
    p = ScriptedPeer().start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def ops_stack(kafka: str, work_dir: Path, peer: ScriptedPeer) -> Iterator[Stack]:
    stack = Stack(work_dir, kafka, smtp_routes=f"*=127.0.0.1:{peer.port}", scanners="none",
                  rate_limit="100000/60s", retry_schedule="200ms,400ms")
    try:
        # Everything but delivery: its queue fills up and shows as lag.
        stack.start(["ratelimit", "validate", "scan", "sentfolder", "status"])
        yield stack
    finally:
        stack.stop()


def metrics_of(url: str) -> dict[str, list]:
    code, body, _ = http("GET", url)
    assert code == 200
    text = body.decode() if isinstance(body, bytes) else str(body)
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def lag_cmd(stack: Stack, *args: str) -> str:
    """`mailflow lag ARGS` on `stack`: its output. Run from the checkout under test, as
    the stages are (`python -m` takes the package from the working directory first)."""
    out = subprocess.run([sys.executable, "-m", "mailflow.ops.cli", "lag", *args], env=stack.env,
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, f"mailflow lag {' '.join(args)} exited {out.returncode}: {out.stderr}"
    return out.stdout


def lag_json(stack: Stack) -> dict:
    import orjson

    return orjson.loads(lag_cmd(stack, "--json").strip().splitlines()[-1])


def deliver_running(stack: Stack) -> None:
    """The deliver stage started (the lag test starts it late) and registered."""
    if "deliver" not in stack.procs:
        stack.start_stage("deliver")
    stack.wait_stage("deliver")


def test_lag_shows_waiting_delivery_and_drains(ops_stack: Stack, peer: ScriptedPeer):
    s = ops_stack
    export_port = free_port()
    s._spawn("lagexporter", ["lag", "--serve", str(export_port)])
    p = Producer(producer_config(s.env["MAILFLOW_KAFKA_BOOTSTRAP"]))
    ids = []
    for n in range(500):
        raw = (f"From: ops{n % 9}@mailflow.test\r\nTo: r{n}@d{n % 7}.ops.test\r\nSubject: lag {n}\r\n"
               f"Message-ID: <lag{n}.{time.time_ns()}@t.test>\r\n\r\nx\r\n").encode()
        m = Message(id=f"lag{n:04d}{time.time_ns()}", sender=f"ops{n % 9}@remote.test",
                    recipients=[f"r{n}@d{n % 7}.ops.test"], received_at=time.time(), size=len(raw), body=raw)
        p.produce(f"{s.prefix}submissions", key=m.sender.encode(), value=m.to_json())
        ids.append(m.id)
    assert p.flush(30) == 0
    wait_for(lambda: lag_json(s)["stages"]["deliver"]["total"] == 500, 180, interval=2,
             what="500 records waiting on delivery")
    doc = lag_json(s)["stages"]
    assert doc["deliver"]["consumers"] == 0 and doc["deliver"]["oldest_age"] > 0
    assert doc["sentfolder"]["total"] == 0 and doc["scan"]["total"] == 0
    table = lag_cmd(s)
    assert any(line.startswith("deliver") and line.split()[-3] == "500" for line in table.splitlines()), table

    def exported() -> float:
        fams = metrics_of(f"http://127.0.0.1:{export_port}/metrics")
        return sum(x.value for x in fams.get("mailflow_stage_lag", []) if x.labels["stage"] == "deliver")

    wait_for(lambda: exported() == 500, 60, interval=2, what="the lag metric to say 500")
    s.start_stage("deliver")
    wait_for(lambda: lag_json(s)["stages"]["deliver"]["total"] == 0, 180, interval=2, what="lag back to 0")
    wait_for(lambda: exported() == 0, 60, interval=2, what="the lag metric back to 0")
    assert len(peer.messages) >= 500


def test_metrics_parse_and_hold_the_families(ops_stack: Stack):
    s = ops_stack
    # The registry, read below, has a replica once it has sent a heartbeat (every 5 s)
    # while holding partitions: the 500 of the lag test can be done before that.
    deliver_running(s)
    # Some traffic through the API so every process has counted something.
    code, doc, _ = s.submit({"from": "m@mailflow.test", "to": "x@metrics.test", "text": "hi"})
    assert code == 202
    wait_for(lambda: (s.status(doc["id"]) or {}).get("final"), 120, what="metrics message final")
    api = metrics_of(f"{s.api}/metrics")
    assert api["mailflow_api_accepted"][0].value >= 1
    assert any(x.labels.get("status") == "202" for x in api["mailflow_api_requests"])
    by_stage = {v["stage"]: v["url"] for v in s.registry().values()}
    deliver = metrics_of(f"{by_stage['deliver']}/metrics")
    assert any(x.labels["reply_class"] == "2xx" for x in deliver["mailflow_smtp_replies"])
    assert any(x.labels["stage"] == "deliver" and x.labels["outcome"] == "ok"
               for x in deliver["mailflow_stage_messages"])
    assert any(x.name.endswith("_bucket") for x in deliver["mailflow_stage_processing_seconds"])
    status = metrics_of(f"{by_stage['status']}/metrics")
    assert any(x.labels.get("state") == "delivered" for x in status["mailflow_final_state_seconds"])
    families = {"mailflow_stage_messages", "mailflow_stage_processing_seconds", "mailflow_final_state_seconds",
                "mailflow_smtp_replies", "mailflow_retries", "mailflow_scan_verdicts", "mailflow_scan_seconds",
                "mailflow_scanner_up", "mailflow_stage_lag", "mailflow_stage_oldest_waiting_seconds",
                "mailflow_stage_consumers", "mailflow_api_requests"}
    assert families <= set(deliver) and families <= set(api)


def test_lag_of_two_stages_on_one_topic_each_from_its_own_offset(kafka: str, work_dir: Path):
    """``events`` is the input of status and webhooks: each stage's oldest waiting record
    is read from its own committed offset (one assignment could not hold both, and
    `mailflow lag` exited 1 whenever both lagged on a partition at different offsets)."""
    from confluent_kafka import TopicPartition

    from mailflow.ops.lag import measure
    from streams.topics import ensure_topics, group_client, group_id

    s = Stack(work_dir, kafka)  # topics only: no stage runs
    settings = s.settings()
    ensure_topics(settings)
    events = f"{s.prefix}events"
    p = Producer(producer_config(kafka))
    now_ms = int(time.time() * 1000)
    for age in (60, 10, 10):  # seconds: the first record is older than the other two
        p.produce(events, key=b"k", value=b"{}", partition=0, timestamp=now_ms - age * 1000)
    assert p.flush(30) == 0
    c = group_client(settings, group_id(settings, "status"))
    try:
        c.commit(offsets=[TopicPartition(events, 0, 1)], asynchronous=False)  # status read the first
    finally:
        c.close()
    lags = {x.stage: x for x in measure(settings, ["status", "webhooks"])}
    assert lags["status"].total == 2 and lags["webhooks"].total == 3
    assert lags["status"].oldest_age == pytest.approx(10, abs=5), lags["status"]
    assert lags["webhooks"].oldest_age == pytest.approx(60, abs=5), lags["webhooks"]
