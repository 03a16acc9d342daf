"""agents.retry: a refused commit does not end the stage; flushes, scans' markers and held records."""

from __future__ import annotations

import time
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException

from agents.retry import RetryStage, due_at
from mailflow.ops.queue import parse_controls
from schemas.mail import Delivery, RetryState


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


# ---- operators' queue actions: the stage's moves, with recording stand-ins for the clients


class _Msg:
    def __init__(self, topic: str, partition: int, offset: int, key: bytes, value: bytes,
                 written: float) -> None:
        self._t, self._p, self._o, self._k, self._v, self._w = topic, partition, offset, key, value, written

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes:
        return self._k

    def value(self) -> bytes:
        return self._v

    def timestamp(self) -> tuple[int, int]:
        return (1, int(self._w * 1000))


class _Recorder(_Consumer):
    def __init__(self) -> None:
        super().__init__(None)
        self.paused: list[Any] = []

    def pause(self, tps: Any) -> None:
        self.paused += [(tp.topic, tp.partition, tp.offset) for tp in tps]

    def seek(self, tp: Any) -> None:
        pass


class _View:
    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def controls(self) -> Any:
        return parse_controls(self.values)


def _queue_stage(values: dict[str, Any]) -> tuple[RetryStage, _Recorder, list[tuple[str, bytes, bytes]]]:
    stage = _stage(_Recorder())
    sent: list[tuple[str, bytes, bytes]] = []
    stage.produce_acked = sent.extend  # type: ignore[method-assign]
    stage.control = _View(values)  # type: ignore[assignment]
    stage.delivery, stage.errors, stage.hold_topic = "t.delivery", "t.errors", "t.retry.hold"
    stage.paused, stage.lanes, stage.lanes_paused = [], {}, set()
    return stage, stage.consumer, sent  # type: ignore[return-value]


def _record(topic: str, offset: int, domain: str, msg_id: str, retry: dict[str, Any], written: float) -> _Msg:
    """A record as the deliver stage writes it to a retry tier or ``retry.hold``;
    `retry`: `RetryState` fields (unchecked: a test may write a bad one)."""
    state = RetryState(attempt=1, first_attempt=written,
                       history=[{"ts": written, "attempt": 1, "error": "451"}]).with_(**retry)
    msg = Delivery(id=msg_id, sender="a@mailflow.test", recipients=[f"x@{domain}"], received_at=written,
                   size=5, body=b"hello", domain=domain, retry=state)
    return _Msg(topic, 0, offset, domain.encode(), msg.to_json(), written)


def test_a_flushed_domain_goes_now_and_others_wait():
    now = time.time()
    stage, consumer, sent = _queue_stage({"flush|domain|f.test": {"ts": now}})
    stage.on_deferred(_record("t.retry.1", 5, "other.test", "A", {"due": now + 3600}, now - 10))
    stage.on_deferred(_record("t.retry.1", 6, "f.test", "B", {"due": now + 3600}, now - 10))
    assert consumer.paused == [("t.retry.1", 0, 5)]  # the other domain's head waits its hour
    assert [(t, k) for t, k, _ in sent] == [("t.delivery", b"f.test")]
    assert consumer.commits == [[("t.retry.1", 0, 7)]]


def test_a_record_a_flush_scan_sent_is_committed_past_not_sent_again():
    now = time.time()
    stage, consumer, sent = _queue_stage({
        "flush|domain|f.test": {"ts": now},
        "flushed|domain|f.test|t.retry.1|0": {"flush_ts": now, "through": 9}})
    stage.on_deferred(_record("t.retry.1", 6, "f.test", "B", {"due": now + 3600}, now - 10))
    assert sent == [] and consumer.commits == [[("t.retry.1", 0, 7)]]


def test_held_records_wait_uncommitted_and_a_release_frees_only_its_own():
    now = time.time()
    holds = {"hold|domain|a.test": {"held": True, "since": now - 60},
             "hold|domain|b.test": {"held": True, "since": now - 60}}
    stage, consumer, sent = _queue_stage(holds)
    for offset, domain in enumerate(["a.test", "b.test", "a.test"]):
        stage.on_held(_record("t.retry.hold", offset, domain, f"M{offset}", {"held_at": now - 30}, now - 30))
    assert sent == [] and consumer.commits == []  # all held: all of them lag
    del holds["hold|domain|b.test"]  # b.test released
    stage.settle_lane(("t.retry.hold", 0), stage.control.controls())
    assert [(t, k) for t, k, _ in sent] == [("t.retry.hold", b"a.test"), ("t.delivery", b"b.test"),
                                            ("t.retry.hold", b"a.test")]
    forwarded = orjson.loads(sent[1][2])
    assert "held_at" not in forwarded["meta"] and forwarded["meta"]["history"][-1]["held_for"] >= 30
    assert consumer.commits == [[("t.retry.hold", 0, 3)]] and stage.lanes[("t.retry.hold", 0)] == []


def test_due_at_reads_the_typed_record_and_poison_is_none():
    now = time.time()
    assert due_at(_record("t.retry.1", 0, "a.test", "A", {"due": now + 5}, now).value()) == now + 5
    assert due_at(b"not json") is None
    assert due_at(orjson.dumps({"id": "A", "meta": {"due": now}})) is None  # no envelope: not a record
    assert due_at(_record("t.retry.1", 0, "a.test", "A", {}, now).value()) is None  # no due


def test_a_poison_deferred_record_is_parked_with_the_parsers_reason_and_committed_past():
    now = time.time()
    stage, consumer, sent = _queue_stage({})
    bad = _record("t.retry.1", 3, "a.test", "A", {"due": "soon"}, now)
    stage.on_deferred(bad)
    assert [(t, k) for t, k, _ in sent] == [("t.errors", b"a.test")]
    err = orjson.loads(sent[0][2])
    assert (err["stage"], err["state"], err["reason"]) == ("retry", "poison", "bad_field")
    assert "meta.due" in err["detail"] and err["record"] == bad.value().decode()
    assert consumer.commits == [[("t.retry.1", 0, 4)]] and consumer.paused == []


def test_a_due_record_goes_to_delivery_byte_for_byte():
    now = time.time()
    stage, consumer, sent = _queue_stage({})
    rec = _record("t.retry.2", 8, "a.test", "A", {"due": now - 1, "tier": 2}, now - 100)
    stage.on_deferred(rec)
    assert sent == [("t.delivery", b"a.test", rec.value())]
    assert consumer.commits == [[("t.retry.2", 0, 9)]]


def test_a_poison_held_record_is_parked_and_committed_past():
    stage, consumer, sent = _queue_stage({})
    stage.on_held(_Msg("t.retry.hold", 0, 0, b"a.test", b'{"id": "A"}', time.time()))
    assert [t for t, _, _ in sent] == ["t.errors"] and orjson.loads(sent[0][2])["state"] == "poison"
    assert consumer.commits == [[("t.retry.hold", 0, 1)]]
