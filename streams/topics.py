"""The topic graph, declared once.

Every topic of the contract (``submissions``, ``admitted``, ``local``, ``outgoing``,
``clean``, ``delivery``, ``retry.1..N``, ``dead``, ``errors``, ``events``) plus
compacted topics of our own: ``throttle`` (senders the rate limiter currently
holds back, read by the ingress to answer 429), ``registry`` (the web address
of each live worker, read by the ingress to route mailbox and status reads),
``auth`` (API keys and mailbox tokens by id: hashes only, see mailflow/api/auth.py),
``idempotency`` (credential + Idempotency-Key -> request hash and message id;
compacted and also deleted after 2 days, the window being 24 h), ``domains``
(sending domains and their DKIM selectors, private keys sealed: mailflow/mta/domains.py),
``suppressions`` ((sender domain, recipient) -> reason; see mailflow/suppression.py),
``webhooks`` (webhook id -> URL, events, owner, encrypted secret; mailflow/webhooks.py)
and ``queue.control`` (operators' holds, flushes and bounce requests: see
mailflow/ops/queue.py); held mail waits on ``retry.hold`` (key: domain), and the
webhooks stage's deliveries wait on its retry tiers ``webhooks.retry.1..N``.

`ensure_topics` creates what is missing at start; partition count and replication
come from the settings (``MAILFLOW_PARTITIONS``, ``MAILFLOW_REPLICATION``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mailflow.config import Settings
from mailflow.webhooks import retry_schedule as webhook_retry_schedule


@dataclass(frozen=True)
class TopicSpec:
    name: str  # short name, without the prefix
    compacted: bool = False
    partitions: int | None = None  # None: the settings' default
    config: tuple[tuple[str, str], ...] = ()  # extra topic configs


def topic_specs(settings: Settings) -> list[TopicSpec]:
    specs = [
        TopicSpec(n)
        for n in ("submissions", "admitted", "local", "outgoing", "clean", "delivery",
                  "dead", "errors", "events")
    ]
    specs += [TopicSpec(f"retry.{i}") for i in range(1, len(settings.retry_schedule) + 1)]
    # Held mail (`mailflow queue hold`), an input of the retry stage like the tiers,
    # so its consumer lag shows it; and the operators' queue actions (mailflow/ops/queue.py).
    specs += [TopicSpec("retry.hold"), TopicSpec("queue.control", compacted=True, partitions=1)]
    specs += [TopicSpec(f"webhooks.retry.{i}") for i in range(1, len(webhook_retry_schedule()) + 1)]
    specs += [TopicSpec("throttle", compacted=True, partitions=1),
              TopicSpec("registry", compacted=True, partitions=1),
              TopicSpec("auth", compacted=True, partitions=1),
              TopicSpec("domains", compacted=True, partitions=1),
              TopicSpec("suppressions", compacted=True, partitions=1),
              TopicSpec("webhooks", compacted=True, partitions=1),
              TopicSpec("idempotency", compacted=True, partitions=1,
                        config=(("cleanup.policy", "compact,delete"),
                                ("retention.ms", str(2 * 86400 * 1000))))]
    return specs


def full_name(settings: Settings, short: str) -> str:
    """A topic's name on the broker: the settings' prefix and its short name."""
    return f"{settings.topic_prefix}{short}"


def group_id(settings: Settings, stage: str, suffix: str = "") -> str:
    """The consumer group of `stage` (``mailflow.<stage>`` by default): its committed
    offsets are the stage's progress, and its lag the stage's queue (`mailflow lag`).
    Also the name of the stage's Faust app, which Faust uses as its group.

    `suffix` names a stage's other agent or reader (``-retry-2`` for the webhooks
    stage's tiers, ``-scan-<pid>`` for the retry stage's one-off scan), appended."""
    return f"{settings.topic_prefix}{stage}{suffix}"


def ensure_topics(settings: Settings, timeout: float = 30.0,
                  extra: Sequence[tuple[str, int, dict[str, str]]] = ()) -> list[str]:
    """Create every missing topic of the graph, and `extra` (full name, partitions,
    config); return the names created, once the broker reports a leader for each."""
    wanted: list[tuple[str, int, dict[str, str]]] = []
    for spec in topic_specs(settings):
        config = {"cleanup.policy": "compact"} if spec.compacted else {}
        config.update(dict(spec.config))
        wanted.append((full_name(settings, spec.name), spec.partitions or settings.partitions,
                       config))
    return create_topics(settings, [*wanted, *extra], timeout)


def create_topics(settings: Settings, wanted: Sequence[tuple[str, int, dict[str, str]]],
                  timeout: float = 30.0) -> list[str]:
    """Create what of `wanted` is missing; return the names created, once every
    partition of every wanted topic has a leader that serves it.

    A broker that has only just become ready may time out, have no controller yet
    or no leaders: those answers are retried (`mailflow.kafka_ready`), for `timeout`."""
    from confluent_kafka.admin import AdminClient, NewTopic

    from mailflow.kafka_ready import is_transient, retry_kafka, wait_until_served

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    deadline = time.monotonic() + timeout
    created: list[str] = []
    while True:
        existing = set(retry_kafka(lambda: admin.list_topics(timeout=timeout).topics,
                                   "listing topics", timeout))
        new = [
            NewTopic(name, num_partitions=partitions, replication_factor=settings.replication,
                     config={"min.insync.replicas": str(min(2, settings.replication)), **config})
            for name, partitions, config in wanted if name not in existing
        ]
        if not new:
            break
        retry = False
        for name, fut in admin.create_topics(new, operation_timeout=timeout).items():
            try:
                fut.result()
                created.append(name)
            except Exception as exc:  # another process created it first
                if "TOPIC_ALREADY_EXISTS" in str(exc):
                    continue
                if not is_transient(exc) or time.monotonic() > deadline:
                    raise
                retry = True
        if not retry:
            break
        time.sleep(0.5)
    wait_until_served(settings.kafka_bootstrap, [name for name, _, _ in wanted],
                      max(5.0, deadline - time.monotonic()))
    return created


def delete_prefix_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Delete every topic whose name starts with the settings' topic prefix (the
    graph's, and the changelogs and leader topics of the prefix's Faust apps).

    For throwaway stacks with their own prefix (benchmarks): each one leaves ~100
    partitions behind otherwise, and a broker that collected thousands of them
    spends measurably more CPU on each request and on its periodic checkpoints.
    """
    from confluent_kafka.admin import AdminClient

    if not settings.topic_prefix:
        raise ValueError("refusing to delete topics without a topic prefix")
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    names = [t for t in admin.list_topics(timeout=timeout).topics if t.startswith(settings.topic_prefix)]
    if not names:
        return []
    for fut in admin.delete_topics(names, operation_timeout=timeout).values():
        fut.result()
    return names


def group_client(settings: Settings, group: str) -> Any:
    """A consumer of `group` that never joins it: to read or set the group's committed
    offsets. Not AdminClient.list_consumer_group_offsets: librdkafka can crash its main
    thread when an admin client's OffsetFetch meets NOT_COORDINATOR (a NULL group
    handle; confluent-kafka-javascript #374); a consumer has its group handle."""
    from confluent_kafka import Consumer

    return Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group,
                     "enable.auto.commit": False})


def init_group_offsets(settings: Settings, group: str, topics: Sequence[str],
                       timeout: float = 10.0) -> int:
    """Commit the log start offset for every partition of `topics` on which `group`
    has no committed offset yet; return how many were set.

    A stage's group must read its input from the beginning. A member that is given
    a partition the group never committed on falls back to a reset policy: a
    replica joining while another had handled but not yet committed the partition
    would begin at the log's end and never handle the records in between. With an
    offset committed before any member consumes, there is nothing to fall back on. Only an empty group accepts
    this commit; once members are consuming, they commit and this does nothing.
    """
    from confluent_kafka import KafkaException, TopicPartition

    from mailflow.kafka_ready import retry_kafka, wait_for_partitions

    c = group_client(settings, group)
    try:
        md = retry_kafka(lambda: c.list_topics(timeout=timeout), "listing topics", timeout)
        present = [t for t in topics if t in md.topics]
        marks = wait_for_partitions(c, present, 3 * timeout)
        tps = [TopicPartition(t, p) for t, p in marks]
        # A fresh broker's offsets topic (the group coordinator) may still be in the making.
        committed = retry_kafka(lambda: c.committed(tps, timeout=timeout),
                                f"reading the committed offsets of {group}", 3 * timeout)
        missing = [tp for tp in committed if tp.offset < 0]
        if not missing:
            return 0
        starts = [TopicPartition(tp.topic, tp.partition, marks[(tp.topic, tp.partition)][0])
                  for tp in missing]
        try:
            c.commit(offsets=starts, asynchronous=False)
        except KafkaException:  # the group has members by now: they commit
            return 0
        return len(starts)
    finally:
        c.close()
