"""Fixtures for the stages' handler tests: a Faust app that is never started, with
its tables in memory, so a stage registers its tables and agents without a broker, and a producer
that acknowledges at once. A handler is called directly; what it returns
(`streams.runtime.Outputs`) is asserted as data."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faust
import pytest

from mailflow.config import Settings
from mailflow.ids import new_id
from schemas.mail import MailRecord, Submission


@dataclass
class FakeKafkaMessage:
    timestamp: float
    partition: int = 0


@dataclass
class FakeEvent:
    """The part of a Faust event the stages and the runtime read."""

    value: bytes
    message: FakeKafkaMessage = field(default_factory=lambda: FakeKafkaMessage(time.time()))


class AckingProducer:
    """Acknowledges every record at once, keeping it: (topic, key, value, partition)."""

    def __init__(self) -> None:
        self.acked: list[tuple[str, bytes | None, bytes | None, int | None]] = []

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                partition: int | None = None) -> asyncio.Future[tuple[int, int]]:
        fut = asyncio.get_running_loop().create_future()
        self.acked.append((topic, key, value, partition))
        fut.set_result((partition or 0, len(self.acked) - 1))
        return fut


@pytest.fixture
def app(tmp_path) -> faust.App:
    # A Kafka transport is made (agents need one) but never started: nothing connects.
    return faust.App(f"test-{new_id()}", broker="kafka://127.0.0.1:1", store="memory://",
                     datadir=str(tmp_path / "faust"))


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, scanners=(), local_domains=frozenset({"mailflow.local"}))


@pytest.fixture
def one_partition() -> Callable[[Any], None]:
    """Outside a stream a table has no current event: its writes go to partition 0."""
    def fix(table: Any) -> None:
        table.partition_for_key = lambda key: 0
    return fix


def message(sender: str = "alice@shop.test", recipients: list[str] | None = None,
            body: bytes | None = b"From: alice@shop.test\r\nTo: bob@x.test\r\nSubject: hi\r\n\r\nhello\r\n",
            kind: type[MailRecord] = Submission, **kw: Any) -> Any:
    return kind(id=new_id(), sender=sender, recipients=recipients or ["bob@x.test"],
                received_at=time.time(), size=len(body or b"x" * 100), body=body, **kw)


@pytest.fixture
def make_message() -> Callable[..., Any]:
    """`message(sender=..., recipients=..., body=..., kind=Submission, **fields)`: a
    record of the input topic's type (`schemas.mail`: `Submission`, `Outgoing`,
    `LocalCopy`, `Delivery`) to hand a stage; `fields` are that type's."""
    return message


@pytest.fixture
def producer() -> AckingProducer:
    return AckingProducer()


@pytest.fixture
def make_event(app: faust.App) -> Callable[[bytes], faust.EventT]:
    """`make_event(raw)`: a Faust event of `raw` on partition 0, timestamped now (a
    windowed table reads the event's Kafka timestamp)."""
    from faust.types.tuples import Message as KafkaMessage

    def make(raw: bytes, ts: float | None = None) -> faust.EventT:
        m = KafkaMessage("in", 0, 0, ts or time.time(), 0, [], None, raw, None)
        return faust.Event(app, None, raw, {}, m)
    return make
