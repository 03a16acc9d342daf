"""`mailflow lag`: each stage's queue, read from Kafka's admin API.

Per stage: its consumer group, its input topic(s), and per partition the end
offset, the committed offset and the lag between them (`partition_lag`, the one
rule: the ingress's in-flow control counts its backlog with it too).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from mailflow.config import Settings
from mailflow.kafka_io import coordinates
from streams.app import STAGES, input_topics
from streams.topics import group_client, group_id


def partition_lag(end: int, committed: int | None, start: int) -> int:
    """Records on a partition that its stage has yet to handle: those from the group's
    committed offset to the end offset `end`, or from the log start `start` where the
    group never committed (`committed` None or negative, as Kafka reports it): a stage
    that never ran has all of it waiting. Never negative."""
    return max(0, end - (committed if committed is not None and committed >= 0 else start))


@dataclass
class PartitionLag:
    topic: str
    partition: int
    end: int
    committed: int | None
    lag: int


@dataclass
class StageLag:
    stage: str
    group: str
    topics: list[str]
    partitions: list[PartitionLag]
    oldest_age: float | None = None  # seconds the oldest uncommitted record has waited
    consumers: int | None = None  # members of the stage's consumer group

    @property
    def total(self) -> int:
        return sum(p.lag for p in self.partitions)


def measure(settings: Settings, stages: list[str] | None = None, timeout: float = 10.0) -> list[StageLag]:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    md = admin.list_topics(timeout=timeout)
    out = []
    for stage in stages or list(STAGES):
        group = group_id(settings, stage)
        tps = [TopicPartition(t, p) for t in input_topics(settings, stage) if t in md.topics
               for p in sorted(md.topics[t].partitions)]
        if not tps:
            out.append(StageLag(stage, group, input_topics(settings, stage), []))
            continue
        ends = {(tp.topic, tp.partition): f.result().offset for tp, f in
                admin.list_offsets({tp: OffsetSpec.latest() for tp in tps},
                                   request_timeout=timeout).items()}
        starts = {(tp.topic, tp.partition): f.result().offset for tp, f in
                  admin.list_offsets({tp: OffsetSpec.earliest() for tp in tps},
                                     request_timeout=timeout).items()}
        committed = {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None)
                     for tp in _committed(settings, group, tps, timeout)}
        parts = []
        for tp in tps:
            key = (tp.topic, tp.partition)
            c = committed.get(key)
            end = ends[key]
            parts.append(PartitionLag(tp.topic, tp.partition, end, c,
                                      partition_lag(end, c, starts[key])))
        out.append(StageLag(stage, group, input_topics(settings, stage), parts))
    _oldest_ages(settings, out, timeout)
    _members(admin, out, timeout)
    return out


def _committed(settings: Settings, group: str, tps: list[TopicPartition],
               timeout: float) -> list[TopicPartition]:
    """The group's committed offsets (through `group_client`: `--serve` runs for days)."""
    c = group_client(settings, group)
    try:
        return c.committed(tps, timeout=timeout)
    finally:
        c.close()


def _oldest_ages(settings: Settings, lags: list[StageLag], timeout: float) -> None:
    """Read the first uncommitted record of each lagging partition for its timestamp.

    A topic can be the input of more than one stage (``events``: status and webhooks),
    each stage at its own committed offset, and a consumer takes a partition once per
    assignment: the reads go in rounds, one offset per partition in each.
    """
    from confluent_kafka import Consumer

    heads: dict[tuple[str, int], dict[int, list[StageLag]]] = {}
    for s in lags:
        for p in s.partitions:
            if p.lag > 0:
                offset = p.committed if p.committed is not None else max(0, p.end - p.lag)
                heads.setdefault((p.topic, p.partition), {}).setdefault(offset, []).append(s)
    if not heads:
        return
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "mailflow-lag-reader",
                  "enable.auto.commit": False, "enable.partition.eof": False})
    try:
        deadline = time.monotonic() + timeout
        now = time.time()
        while heads and time.monotonic() < deadline:
            round_ = {tp: min(offsets) for tp, offsets in heads.items()}
            c.assign([TopicPartition(t, p, o) for (t, p), o in round_.items()])
            pending = dict(round_)
            paused = []
            while pending and time.monotonic() < deadline:
                m = c.poll(0.2)
                if m is None or m.error():
                    continue
                topic, partition, _offset = coordinates(m)
                if (topic, partition) not in pending:
                    continue
                offset = pending.pop((topic, partition))
                paused.append(TopicPartition(topic, partition))
                c.pause(paused[-1:])
                age = max(0.0, now - m.timestamp()[1] / 1000.0)
                for stage in heads[(topic, partition)][offset]:
                    stage.oldest_age = max(stage.oldest_age or 0.0, age)
            if paused:
                c.resume(paused)
            for tp, offset in round_.items():
                del heads[tp][offset]
                if not heads[tp]:
                    del heads[tp]
    finally:
        c.close()


def _members(admin: AdminClient, lags: list[StageLag], timeout: float) -> None:
    groups = [s.group for s in lags]
    try:
        futures = admin.describe_consumer_groups(groups, request_timeout=timeout)
    except Exception:  # older brokers: leave it unknown
        return
    for s in lags:
        try:
            s.consumers = len(futures[s.group].result().members)
        except Exception:
            s.consumers = 0


def render(lags: list[StageLag]) -> str:
    lines = [f"{'stage':<11} {'group':<22} {'input':<24} {'partition lags':<40} {'total':>8} "
             f"{'oldest':>8} {'consumers':>9}"]
    for s in lags:
        per = " ".join(f"{p.lag}" for p in s.partitions) or "(no topic)"
        topics = ",".join(t.split(".", 1)[-1] for t in s.topics)
        if len(topics) > 24:
            topics = topics[:21] + "..."
        oldest = f"{s.oldest_age:.0f}s" if s.oldest_age is not None else "-"
        members = str(s.consumers) if s.consumers is not None else "?"
        lines.append(f"{s.stage:<11} {s.group:<22} {topics:<24} {per[:40]:<40} {s.total:>8} "
                     f"{oldest:>8} {members:>9}")
    return "\n".join(lines)


def to_json(lags: list[StageLag]) -> dict[str, Any]:
    return {"ts": time.time(),
            "stages": {s.stage: {"group": s.group, "topics": s.topics, "total": s.total,
                                 "oldest_age": s.oldest_age, "consumers": s.consumers,
                                 "partitions": [asdict(p) for p in s.partitions]} for s in lags}}


def export(lags: list[StageLag]) -> None:
    """Set the lag gauges; one exporter process does this, so replicas never double count."""
    from mailflow import metrics

    for s in lags:
        for p in s.partitions:
            metrics.LAG.labels(s.stage, p.topic, str(p.partition)).set(p.lag)
        metrics.OLDEST_SECONDS.labels(s.stage).set(s.oldest_age or 0.0)
        if s.consumers is not None:
            metrics.CONSUMERS.labels(s.stage).set(s.consumers)


def serve(settings: Settings, port: int, interval: float = 10.0) -> int:
    """`mailflow lag --serve PORT`: the single exporter of the lag gauges."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=settings.api_host)
    print(f"mailflow lag: exporting on http://{settings.api_host}:{port}/metrics every {interval:g}s",
          file=sys.stderr, flush=True)
    while True:
        try:
            export(measure(settings))
        except Exception as exc:  # the broker may be away for a while; keep serving
            print(f"mailflow lag: {exc}", file=sys.stderr, flush=True)
        time.sleep(interval)


def run(settings: Settings, watch: bool, as_json: bool, interval: float = 2.0) -> int:
    while True:
        lags = measure(settings)
        if as_json:
            print(orjson.dumps(to_json(lags)).decode(), flush=True)
        else:
            if watch:
                sys.stdout.write("\x1b[2J\x1b[H")
            print(render(lags), flush=True)
        if not watch:
            return 0
        time.sleep(interval)
