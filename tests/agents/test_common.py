"""agents.common: the awaited changelog sends of an AckedTable; table writes the
broker refused, sent again before a record's retry."""

from __future__ import annotations

import asyncio

import faust
import orjson
import pytest

from agents.common import JSON_TABLE, AckedTable, StageIO, acked_table, acked_writes
from mailflow.config import Settings
from mailflow.kafka_io import BrokerUnavailable


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch, tmp_path) -> AckedTable:
    sent: list[tuple] = []

    def send_changelog(self, partition, key, value, *args, **kwargs):  # Faust's: to Kafka
        sent.append((key, value))
        return f"future of {key}={value}"

    monkeypatch.setattr(faust.Table, "send_changelog", send_changelog)
    app = faust.App("test-acked", broker="memory://", store="memory://", datadir=str(tmp_path))
    t = acked_table(app, "counts", default=int, partitions=1)
    t.sent = sent  # type: ignore[attr-defined]
    return t


def test_an_acked_table_is_one_of_the_apps_tables(table: AckedTable):
    assert table.app.tables["counts"] is table


def test_writes_inside_acked_writes_hand_over_their_changelog_sends(table: AckedTable):
    with acked_writes() as acks:
        table.send_changelog(0, "a", 1)
        table.send_changelog(0, "b", 2)
    table.send_changelog(0, "c", 3)  # outside: sent, not collected
    assert acks == ["future of a=1", "future of b=2"]
    assert table.sent == [("a", 1), ("b", 2), ("c", 3)]  # type: ignore[attr-defined]


def test_acked_writes_nest_and_restore(table: AckedTable):
    with acked_writes() as outer:
        with acked_writes() as inner:
            table.send_changelog(0, "x", 1)
        table.send_changelog(0, "y", 1)
    assert inner == ["future of x=1"] and outer == ["future of y=1"]


class _FlakyProducer:
    """Stands in for the stage's librdkafka producer: the first `fail` records are
    refused (the broker away), the rest acknowledged and kept."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.acked: list[tuple[str, bytes, bytes, int | None]] = []

    def produce(self, topic: str, key: bytes, value: bytes, partition: int | None = None):
        fut = asyncio.get_running_loop().create_future()
        if self.fail:
            self.fail -= 1
            fut.set_exception(BrokerUnavailable("the Kafka broker is not reachable"))
        else:
            self.acked.append((topic, key, value, partition))
            fut.set_result((partition or 0, len(self.acked) - 1))
        return fut


@pytest.fixture
def stage(tmp_path) -> tuple[StageIO, faust.Table, _FlakyProducer]:
    app = faust.App("test-stageio", broker="memory://", store="memory://", datadir=str(tmp_path))
    ledger = app.Table("ledger", partitions=1, schema=JSON_TABLE)
    ledger.partition_for_key = lambda key: 0  # outside a stream; the partition is not the point
    io = StageIO(app, Settings(), "deliver")
    producer = _FlakyProducer(fail=1)
    io._producer = producer  # type: ignore[assignment]
    return io, ledger, producer


async def test_a_table_write_the_broker_refused_is_sent_again_before_the_retry(stage):
    io, ledger, producer = stage
    handled = 0

    async def handle(raw: bytes) -> list:
        # As the deliver stage: work the local store says is done is not done again.
        nonlocal handled
        handled += 1
        if ledger.data.get("m1|a@x.test") is None:
            return [io.table_write(ledger, "m1|a@x.test", {"kind": "delivered"})]
        return []

    await io.process(b"record", handle)
    assert handled == 2  # the first attempt's write failed, so the record ran again
    assert [(k, orjson.loads(v)) for _, k, v, _ in producer.acked] == [
        (b'"m1|a@x.test"', {"kind": "delivered"})]  # JSON-encoded key, as Faust's; the retry found it done; resync sent it
    assert io._unsynced == {}


async def test_resync_sends_the_keys_current_value_not_the_refused_one(stage):
    io, ledger, producer = stage
    refused = io.table_write(ledger, "page", ["a"])
    with pytest.raises(BrokerUnavailable):
        await refused
    await asyncio.sleep(0)  # the failure is recorded by the future's callback
    ledger.data["page"] = ["a", "b"]  # a later write, as a mailbox page grows
    await io.resync()
    assert [orjson.loads(v) for _, _, v, _ in producer.acked] == [["a", "b"]]


class _Ev:
    """The part of a Faust event a batch reads: its value (and a weak reference)."""

    def __init__(self, value: bytes) -> None:
        self.value = value


async def test_a_batch_hands_each_record_on_in_order_and_redoes_only_the_one_refused(stage):
    io, ledger, producer = stage  # the first record produced is refused
    calls: list[bytes] = []

    async def forward(raw: bytes) -> list:
        calls.append(raw)
        return [await io.send("clean", raw, raw)]

    await io.process_batch([_Ev(b"r1"), _Ev(b"r2"), _Ev(b"r3")], forward)
    assert calls == [b"r1", b"r2", b"r3", b"r1"]  # in offset order; r1 again after the refusal
    assert sorted(k for _, k, _, _ in producer.acked) == [b"r1", b"r2", b"r3"]


async def test_a_poison_pill_in_a_batch_is_parked_and_the_rest_pass(stage):
    from schemas.records import PoisonPill

    io, _, producer = stage
    producer.fail = 0

    async def handle(raw: bytes) -> list:
        if raw == b"bad":
            raise PoisonPill("unparseable", "not JSON")
        await asyncio.sleep(0)  # a handler that waits goes on as a task
        return [await io.send("clean", raw, raw)]

    await io.process_batch([_Ev(b"ok1"), _Ev(b"bad"), _Ev(b"ok2")], handle)
    topics = sorted((t.rsplit(".", 1)[-1], k) for t, k, _, _ in producer.acked)
    assert topics == [("clean", b"ok1"), ("clean", b"ok2"), ("errors", None)]
    parked = [orjson.loads(v) for t, _, v, _ in producer.acked if t.endswith("errors")]
    assert parked[0]["reason"] == "unparseable" and parked[0]["record"] == "bad"


async def test_each_record_of_a_batch_is_faust_current_event_across_its_waits(stage):
    from faust.streams import current_event

    io, _, producer = stage
    producer.fail = 0
    seen: list[tuple[bytes, bytes]] = []

    async def handle(raw: bytes) -> list:
        await asyncio.sleep(0)  # the other records' handlers run meanwhile
        seen.append((raw, current_event().value))
        return []

    await io.process_batch([_Ev(b"a"), _Ev(b"b")], handle)
    assert sorted(seen) == [(b"a", b"a"), (b"b", b"b")]
