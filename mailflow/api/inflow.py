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

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import GroupCoordinatorNotAvailableError
from aiokafka.structs import TopicPartition

from mailflow import metrics
from mailflow.config import Settings
from mailflow.ops.lag import partition_lag
from streams.app import input_topics
from streams.topics import group_id

log = logging.getLogger("mailflow.inflow")

# The stages between acceptance and a final state.
PIPELINE = ("ratelimit", "validate", "store", "scan", "sentfolder", "deliver")
# How often the sampler asks again how many partitions the pipeline's topics have
# (seconds): they change only when an operator adds some.
PARTITIONS_EVERY = 30.0


def must_wait(backlog: int, limit: int, waited: float, max_delay: float) -> bool:
    """Whether a submission that has waited `waited` seconds waits on."""
    return limit > 0 and backlog > limit and waited < max_delay


class BacklogReader:
    """Records written to the pipeline stages' inputs that their groups have not
    committed, counted as `mailflow lag` counts them (`mailflow.ops.lag.partition_lag`).

    aiokafka (Python), not confluent-kafka's AdminClient: librdkafka's OffsetFetch
    from a client that is not a group member can crash its main thread when the
    group's coordinator answers NOT_COORDINATOR (a NULL group handle; confluent-kafka
    -javascript #374), which a long-running sampler meets within minutes.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                         enable_auto_commit=False)
        self.admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        self._started = False
        self._partitions: dict[str, list[int]] = {}
        self._partitions_at = -PARTITIONS_EVERY

    async def read(self) -> int:
        if not self._started:
            await self.consumer.start()
            await self.admin.start()
            self._started = True
        wanted = {s: input_topics(self.settings, s) for s in PIPELINE}
        now = time.monotonic()
        if now - self._partitions_at >= PARTITIONS_EVERY or not self._partitions:
            self._partitions = {
                d["topic"]: sorted(p["partition"] for p in d["partitions"])
                for d in await self.admin.describe_topics(sorted({t for ts in wanted.values() for t in ts}))
                if d.get("error_code", 0) == 0
            }
            self._partitions_at = now
        by_stage = {stage: [TopicPartition(t, p) for t in topics for p in self._partitions.get(t, [])]
                    for stage, topics in wanted.items()}
        every = sorted({tp for tps in by_stage.values() for tp in tps})
        if not every:
            return 0
        # One offsets request each for the ends and the starts of every partition (the
        # stages share topics: store and sentfolder both read `local`), not two per stage.
        ends = await self.consumer.end_offsets(every)
        starts = await self.consumer.beginning_offsets(every)
        total = 0
        for stage, tps in by_stage.items():
            if not tps:
                continue
            try:
                committed = await self.admin.list_consumer_group_offsets(
                    group_id(self.settings, stage), partitions=tps)
            except GroupCoordinatorNotAvailableError:
                continue  # a broker whose offsets topic is not made yet: nothing committed
            total += sum(partition_lag(ends[tp], meta.offset, starts[tp])
                         for tp, meta in committed.items() if tp in ends)
        return total

    async def close(self) -> None:
        if self._started:
            await self.consumer.stop()
            await self.admin.close()


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
        reader = BacklogReader(self.settings)
        try:
            while True:
                try:
                    self.backlog = await asyncio.wait_for(reader.read(), 10)
                    metrics.PIPELINE_BACKLOG.set(self.backlog)
                except Exception as exc:  # broker away: stop holding submissions back
                    self.backlog = 0
                    log.debug("in-flow: backlog unknown (%r)", exc)
                await asyncio.sleep(self.interval)
        finally:
            await reader.close()

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
