"""Waiting until a broker that has just come up can serve a request.

A broker answers metadata requests before it can serve everything else: for a few
hundred milliseconds after it starts (or after a topic is created) a partition may
have no leader yet, or a leader that metadata names but that is still loading the
partition and answers ``NOT_LEADER_FOR_PARTITION``; the group coordinator's topic
may still be in the making. Each first read or write of a process (topic creation,
the credentials and registry reads, a group's first offsets) goes through
`wait_for_partitions` or `retry_kafka` here, which retry exactly those transient
errors for a bounded time and then raise `BrokerNotReady` naming what did not
become ready. Errors that retrying cannot cure (a bad request, an authorization
failure) are raised at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

# Codes a broker that is still starting, electing leaders or loading partitions answers.
_TRANSIENT = {
    "NOT_LEADER_FOR_PARTITION", "LEADER_NOT_AVAILABLE", "UNKNOWN_TOPIC_OR_PART",
    "_TIMED_OUT", "REQUEST_TIMED_OUT", "_TRANSPORT", "_ALL_BROKERS_DOWN",
    "NOT_CONTROLLER", "COORDINATOR_NOT_AVAILABLE", "NOT_COORDINATOR",
    "COORDINATOR_LOAD_IN_PROGRESS", "_UNKNOWN_PARTITION", "_UNKNOWN_TOPIC",
    "BROKER_NOT_AVAILABLE", "_WAIT_COORD", "NOT_ENOUGH_REPLICAS", "FENCED_LEADER_EPOCH",
    "UNKNOWN_LEADER_EPOCH", "OFFSET_NOT_AVAILABLE", "_NODE_UPDATE", "_WAIT_CACHE",
    # A cluster node killed while a request to it was out: librdkafka drops the node's
    # handle once metadata no longer names it, failing that request (a stage starting
    # in a cluster chaos run exited on it).
    "_DESTROY_BROKER",
}


class BrokerNotReady(RuntimeError):
    """The broker did not become able to serve a request within the wait."""


def transient_codes() -> frozenset[int]:
    from confluent_kafka import KafkaError

    return frozenset(getattr(KafkaError, n) for n in _TRANSIENT if hasattr(KafkaError, n))


def is_transient(exc: BaseException) -> bool:
    """True for a Kafka error that a starting broker answers and that goes away by
    itself (see the module docstring); False for anything else."""
    from confluent_kafka import KafkaError, KafkaException

    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        err: KafkaError = exc.args[0]
        return err.code() in transient_codes() or bool(err.retriable())
    return isinstance(exc, TimeoutError)


def retry_kafka(call: Callable[[], T], what: str, timeout: float = 60.0,
                interval: float = 0.2) -> T:
    """``call()``, called again while it raises a transient Kafka error, for at most
    `timeout` seconds; then `BrokerNotReady` saying `what` could not be done and the
    last error. Non-transient errors propagate at once."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if time.monotonic() >= deadline:
                raise BrokerNotReady(f"{what}: the Kafka broker could not serve it within "
                                     f"{timeout:.0f} s (last error: {exc})") from exc
        time.sleep(interval)
        interval = min(1.0, interval * 1.5)


def wait_for_partitions(client: Any, topics: Iterable[str], timeout: float = 60.0,
                        request_timeout: float = 5.0) -> dict[tuple[str, int], tuple[int, int]]:
    """Wait until every partition of every one of `topics` exists, has a leader, and
    that leader answers an offsets request; return the (low, high) watermarks of each
    ``(topic, partition)``.

    `client` is a confluent-kafka Consumer (it asks the watermarks; never joins a
    group). The offsets request is the point: metadata can name a leader that still
    answers ``NOT_LEADER_FOR_PARTITION`` for a moment. Raises `BrokerNotReady`
    after `timeout` seconds, naming the topics still waiting.
    """
    from confluent_kafka import TopicPartition

    names = list(dict.fromkeys(topics))
    deadline = time.monotonic() + timeout
    waiting = names
    last: BaseException | str = "no metadata yet"
    interval = 0.1
    while True:
        left = max(0.5, min(request_timeout, deadline - time.monotonic()))
        try:
            # One topic: ask for it alone (a shared broker may hold thousands).
            md = client.list_topics(names[0] if len(names) == 1 else None, timeout=left)
            waiting = [n for n in names if n not in md.topics or md.topics[n].error is not None
                       or not md.topics[n].partitions
                       or any(p.leader < 0 for p in md.topics[n].partitions.values())]
            if not waiting:
                marks = {}
                for n in names:
                    for p in md.topics[n].partitions:
                        marks[(n, p)] = tuple(client.get_watermark_offsets(
                            TopicPartition(n, p), timeout=left, cached=False))
                return marks
            last = f"no leader yet for {', '.join(waiting)}"
        except Exception as exc:
            if not is_transient(exc):
                raise
            last = exc
        if time.monotonic() >= deadline:
            raise BrokerNotReady(f"the Kafka broker did not serve {', '.join(waiting)} within "
                                 f"{timeout:.0f} s (last: {last})")
        time.sleep(interval)
        interval = min(1.0, interval * 1.5)


def probe_consumer(bootstrap: str) -> Any:
    """A consumer for `wait_for_partitions` that never joins its (throwaway) group."""
    import uuid

    from confluent_kafka import Consumer

    return Consumer({"bootstrap.servers": bootstrap, "enable.auto.commit": False,
                     "group.id": f"mailflow-probe-{uuid.uuid4().hex[:8]}"})


def wait_until_served(bootstrap: str, topics: Iterable[str],
                      timeout: float = 60.0) -> dict[tuple[str, int], tuple[int, int]]:
    """`wait_for_partitions` with a consumer of its own, closed afterwards."""
    c = probe_consumer(bootstrap)
    try:
        return wait_for_partitions(c, topics, timeout)
    finally:
        c.close()


class _Quiet:
    """A logger for librdkafka that drops the 'connection refused' noise while waiting."""

    def log(self, *args: object, **kw: object) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return self.log


def quiet_admin(bootstrap: str) -> dict[str, Any]:
    """An admin client's configuration that logs nothing while a broker is away."""
    return {"bootstrap.servers": bootstrap, "log_level": 0, "logger": _Quiet()}


def is_ready(bootstrap: str, timeout: float = 2.0) -> bool:
    """A metadata request answered with at least one broker."""
    from confluent_kafka.admin import AdminClient

    try:
        md = AdminClient(quiet_admin(bootstrap)).list_topics(timeout=timeout)
        return bool(md.brokers)
    except Exception:  # noqa: BLE001 (any failure means: not ready)
        return False
