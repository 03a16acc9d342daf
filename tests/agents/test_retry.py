"""agents.retry: a refused commit does not end the stage."""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, KafkaException

from agents.retry import RetryStage


class _Record:
    def topic(self) -> str:
        return "t.retry.1"

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return 41


class _Consumer:
    def __init__(self, error: int | None) -> None:
        self.error = error
        self.commits: list[Any] = []

    def commit(self, offsets: Any, asynchronous: bool) -> None:
        if self.error is not None:
            raise KafkaException(KafkaError(self.error))
        self.commits.append([(o.topic, o.partition, o.offset) for o in offsets])


def _stage(consumer: _Consumer) -> RetryStage:
    stage = RetryStage.__new__(RetryStage)  # no Kafka clients: only the commit is tried
    stage.consumer = consumer  # type: ignore[assignment]
    return stage


def test_a_forwarded_record_is_committed_past():
    consumer = _Consumer(None)
    assert _stage(consumer).commit_past(_Record()) is True
    assert consumer.commits == [[("t.retry.1", 2, 42)]]


def test_a_commit_refused_by_a_rebalance_is_logged_not_raised(caplog):
    for code in (KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID,
                 KafkaError.REBALANCE_IN_PROGRESS):
        assert _stage(_Consumer(code)).commit_past(_Record()) is False
    assert "may be forwarded again" in caplog.text
