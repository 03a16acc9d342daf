"""In-flow control at the ingress: slow submissions down while the pipeline is behind.

Postfix's ``in_flow_delay`` in mailflow's terms. The backlog is the consumer lag
of the stages a message passes before it is final (ratelimit, validate, store,
scan, sentfolder, deliver; not retry, where mail waits on purpose, nor status),
sampled from Kafka every half second; it counts records, about one per message
and stage. Above ``IN_FLOW_BACKLOG`` a submission waits until the backlog falls
below it, for at most ``IN_FLOW_DELAY``, and is then accepted anyway: the
ingress never refuses mail for being busy, it only stops racing ahead of
delivery, so a closed-loop client's submissions follow the delivery rate and a
queue (and every message's wait in it) stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from mailflow import metrics
from mailflow.config import Settings
from mailflow.lag import input_topics

log = logging.getLogger("mailflow.inflow")

# The stages between acceptance and a final state.
PIPELINE = ("ratelimit", "validate", "store", "scan", "sentfolder", "deliver")


def must_wait(backlog: int, limit: int, waited: float, max_delay: float) -> bool:
    """Whether a submission that has waited `waited` seconds waits on."""
    return limit > 0 and backlog > limit and waited < max_delay


def pipeline_backlog(admin: AdminClient, settings: Settings, timeout: float = 5.0) -> int:
    """Records written to the pipeline stages' inputs that their groups have not
    committed. A group that never committed on a partition counts nothing there:
    at first start nothing has been accepted yet to wait for."""
    topics = {s: input_topics(settings, s) for s in PIPELINE}
    md = admin.list_topics(timeout=timeout).topics
    tps = [TopicPartition(t, p) for ts in topics.values() for t in ts if t in md
           for p in md[t].partitions]
    if not tps:
        return 0
    ends = {(tp.topic, tp.partition): f.result().offset for tp, f in
            admin.list_offsets({tp: OffsetSpec.latest() for tp in tps}, request_timeout=timeout).items()}
    total = 0
    for stage, ts in topics.items():
        mine = [tp for tp in tps if tp.topic in ts]
        if not mine:
            continue
        group = f"{settings.topic_prefix}{stage}"
        result = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, mine)],
                                                   request_timeout=timeout)[group].result()
        for tp in result.topic_partitions:
            if tp.offset >= 0:
                total += max(0, ends[(tp.topic, tp.partition)] - tp.offset)
    return total


class InFlow:
    def __init__(self, settings: Settings, interval: float = 0.5) -> None:
        self.settings = settings
        self.limit = settings.in_flow_backlog
        self.max_delay = settings.in_flow_delay
        self.interval = interval
        self.backlog = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.limit > 0:
            self._task = asyncio.get_running_loop().create_task(self._sample())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def _sample(self) -> None:
        admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap})
        loop = asyncio.get_running_loop()
        while True:
            try:
                self.backlog = await loop.run_in_executor(None, pipeline_backlog, admin, self.settings)
                metrics.PIPELINE_BACKLOG.set(self.backlog)
            except Exception as exc:  # broker away: stop holding submissions back
                self.backlog = 0
                log.debug("in-flow: backlog unknown (%r)", exc)
            await asyncio.sleep(self.interval)

    async def admit(self) -> float:
        """Wait while the pipeline is behind (at most the delay); the seconds waited."""
        start = time.monotonic()
        waited = 0.0
        while must_wait(self.backlog, self.limit, waited, self.max_delay):
            await asyncio.sleep(min(0.05, self.max_delay - waited))
            waited = time.monotonic() - start
        if waited:
            metrics.IN_FLOW_WAIT.observe(waited)
        return waited
