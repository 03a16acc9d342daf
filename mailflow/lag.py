"""`mailflow lag`: each stage's queue, read from Kafka's admin API.

Per stage: its consumer group, its input topic(s), and per partition the end
offset, the committed offset and the lag between them. A stage with no committed
offset on a partition (never ran) counts everything from the log start as lag.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from mailflow.config import Settings
from streams.app import STAGE_INPUT, STAGES
from streams.topics import full_name, topic_specs


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

    @property
    def total(self) -> int:
        return sum(p.lag for p in self.partitions)


def input_topics(settings: Settings, stage: str) -> list[str]:
    short = STAGE_INPUT[stage]
    if short.endswith("*"):
        prefix = short[:-1]
        return [full_name(settings, s.name) for s in topic_specs(settings) if s.name.startswith(prefix)]
    return [full_name(settings, short)]


def measure(settings: Settings, stages: list[str] | None = None, timeout: float = 10.0) -> list[StageLag]:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    md = admin.list_topics(timeout=timeout)
    out = []
    for stage in stages or list(STAGES):
        group = f"{settings.topic_prefix}{stage}"
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
        fut = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, tps)],
                                                request_timeout=timeout)[group]
        committed = {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None)
                     for tp in fut.result().topic_partitions}
        parts = []
        for tp in tps:
            key = (tp.topic, tp.partition)
            c = committed.get(key)
            end = ends[key]
            parts.append(PartitionLag(tp.topic, tp.partition, end, c,
                                      max(0, end - (c if c is not None else starts[key]))))
        out.append(StageLag(stage, group, input_topics(settings, stage), parts))
    return out


def render(lags: list[StageLag]) -> str:
    lines = [f"{'stage':<11} {'group':<22} {'input':<24} {'partition lags':<40} {'total':>8}"]
    for s in lags:
        per = " ".join(f"{p.lag}" for p in s.partitions) or "(no topic)"
        topics = ",".join(t.split(".", 1)[-1] for t in s.topics)
        if len(topics) > 24:
            topics = topics[:21] + "..."
        lines.append(f"{s.stage:<11} {s.group:<22} {topics:<24} {per[:40]:<40} {s.total:>8}")
    return "\n".join(lines)


def to_json(lags: list[StageLag]) -> dict[str, Any]:
    return {"ts": time.time(),
            "stages": {s.stage: {"group": s.group, "topics": s.topics, "total": s.total,
                                 "partitions": [asdict(p) for p in s.partitions]} for s in lags}}


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
