"""streams.runtime: a handler's outputs performed and acknowledged before the input
is done; a refused send redoes the record; table writes the broker refused, sent
again before a record's retry; a windowed table's changelog sends awaited."""

from __future__ import annotations

import asyncio

import faust
import orjson
import pytest

from mailflow.config import Settings
from mailflow.kafka_io import BrokerUnavailable
from streams.runtime import (
    JSON_TABLE,
    Outputs,
    Stage,
    _acked_writes,
    _AckedTable,
    _acting_for,
    windowed_table,
)


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch, tmp_path) -> _AckedTable:
    sent: list[tuple] = []

    def send_changelog(self, partition, key, value, *args, **kwargs):  # Faust's: to Kafka
        sent.append((key, value))
        return f"future of {key}={value}"

    monkeypatch.setattr(faust.Table, "send_changelog", send_changelog)
    app = faust.App("test-acked", broker="memory://", store="memory://", datadir=str(tmp_path))
    t = windowed_table(app, "counts", 60, expires=120, default=int, partitions=1).table
    t.sent = sent  # type: ignore[attr-defined]
    return t


def test_a_windowed_table_is_one_of_the_apps_tables(table: _AckedTable):
    assert table.app.tables["counts"] is table


def test_writes_inside_acked_writes_hand_over_their_changelog_sends(table: _AckedTable):
    with _acked_writes() as acks:
        table.send_changelog(0, "a", 1)
        table.send_changelog(0, "b", 2)
    table.send_changelog(0, "c", 3)  # outside: sent, not collected
    assert acks == ["future of a=1", "future of b=2"]
    assert table.sent == [("a", 1), ("b", 2), ("c", 3)]  # type: ignore[attr-defined]


def test_acked_writes_nest_and_restore(table: _AckedTable):
    with _acked_writes() as outer:
        with _acked_writes() as inner:
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
def stage(tmp_path) -> tuple[Stage, faust.Table, _FlakyProducer]:
    app = faust.App("test-stageio", broker="memory://", store="memory://", datadir=str(tmp_path))
    ledger = app.Table("ledger", partitions=1, schema=JSON_TABLE)
    ledger.partition_for_key = lambda key: 0  # outside a stream; the partition is not the point
    io = Stage(app, Settings(), "deliver")
    producer = _FlakyProducer(fail=1)
    io._producer = producer  # type: ignore[assignment]
    return io, ledger, producer


async def test_a_table_write_the_broker_refused_is_sent_again_before_the_retry(stage):
    io, ledger, producer = stage
    handled = 0

    async def handle(raw: bytes) -> Outputs:
        # As the deliver stage: work the local store says is done is not done again.
        nonlocal handled
        handled += 1
        out = io.outputs()
        if ledger.data.get("m1|a@x.test") is None:
            out.write(ledger, "m1|a@x.test", {"kind": "delivered"})
        return out

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

    async def forward(raw: bytes) -> Outputs:
        calls.append(raw)
        out = io.outputs()
        out.send("clean", raw, raw)
        return out

    await io.process_batch([_Ev(b"r1"), _Ev(b"r2"), _Ev(b"r3")], forward)
    assert calls == [b"r1", b"r2", b"r3", b"r1"]  # in offset order; r1 again after the refusal
    assert sorted(k for _, k, _, _ in producer.acked) == [b"r1", b"r2", b"r3"]


async def test_a_poison_pill_in_a_batch_is_parked_and_the_rest_pass(stage):
    from schemas.records import PoisonPill

    io, _, producer = stage
    producer.fail = 0

    async def handle(raw: bytes) -> Outputs:
        if raw == b"bad":
            raise PoisonPill("unparseable", "not JSON")
        await asyncio.sleep(0)  # a handler that waits goes on as a task
        out = io.outputs()
        out.send("clean", raw, raw)
        return out

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

    async def handle(raw: bytes) -> Outputs:
        await asyncio.sleep(0)  # the other records' handlers run meanwhile
        seen.append((raw, current_event().value))
        return io.outputs()

    await io.process_batch([_Ev(b"a"), _Ev(b"b")], handle)
    assert sorted(seen) == [(b"a", b"a"), (b"b", b"b")]


class _HeldProducer:
    """A producer whose acks the test gives: every record waits until released."""

    def __init__(self) -> None:
        self.queued: list[tuple[str, bytes | None, bytes | None, asyncio.Future]] = []

    def produce(self, topic: str, key, value, partition: int | None = None):
        fut = asyncio.get_running_loop().create_future()
        self.queued.append((topic, key, value, fut))
        return fut

    def ack_all(self) -> None:
        for i, (_, _, _, fut) in enumerate(self.queued):
            if not fut.done():
                fut.set_result((0, i))


async def test_the_input_is_done_only_after_every_output_is_acknowledged(tmp_path):
    app = faust.App("test-held", broker="memory://", store="memory://", datadir=str(tmp_path))
    ledger = app.Table("ledger", partitions=1, schema=JSON_TABLE)
    ledger.partition_for_key = lambda key: 0
    io = Stage(app, Settings(), "deliver")
    producer = _HeldProducer()
    io._producer = producer  # type: ignore[assignment]
    acked: list[tuple[int, int]] = []

    async def handle(raw: bytes) -> Outputs:
        out = io.outputs()
        out.event("m1", "delivered", ["a@x.test"])
        out.send("dead", "m1", b"dead")
        out.write(ledger, "m1|a@x.test", {"kind": "delivered"})
        out.send("suppressions", "x.test|a@x.test", None, on_ack=lambda p, o: acked.append((p, o)))
        return out

    done = asyncio.ensure_future(io.process_batch([_Ev(b"r")], handle))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not done.done()  # nothing acknowledged yet: the input is not done
    # The table write first (the ledger entry before anything else), then the
    # records in the order the handler added them; a None value is a tombstone.
    short = [(t.rsplit(".", 1)[-1] if t.startswith("mailflow.") else t, k, v)
             for t, k, v, _ in producer.queued]
    assert [t for t, _, _ in short][0].endswith("ledger-changelog")
    assert [(t, k) for t, k, _ in short[1:]] == [("events", b"m1"), ("dead", b"m1"),
                                                ("suppressions", b"x.test|a@x.test")]
    assert short[-1][2] is None
    assert ledger.data["m1|a@x.test"] == {"kind": "delivered"}  # applied at once, before the acks
    producer.queued[1][3].set_result((0, 1))  # one ack is not enough
    await asyncio.sleep(0)
    assert not done.done()
    producer.ack_all()
    await asyncio.wait_for(done, 1)
    assert acked == [(0, 3)]  # on_ack: the suppression record's own (partition, offset)


async def test_retry_later_sends_the_outputs_then_runs_the_record_again(stage, monkeypatch):
    io, _, producer = stage
    producer.fail = 0
    monkeypatch.setattr(asyncio, "sleep", _no_sleep)
    runs = 0

    async def handle(raw: bytes) -> Outputs:
        nonlocal runs
        runs += 1
        out = io.outputs()
        if runs == 1:
            out.event("m1", "validated", ["a@x.test"], {"waiting": "clamd down"})
            out.retry_later("clamd down")
        else:
            out.send("clean", "m1", raw)
        return out

    await io.process(b"r", handle)
    assert runs == 2
    assert [t.rsplit(".", 1)[-1] for t, _, _, _ in producer.acked] == ["events", "clean"]


_real_sleep = asyncio.sleep


async def _no_sleep(delay: float, *args):
    await _real_sleep(0)


async def test_serial_key_runs_copies_one_at_a_time_until_acknowledged(tmp_path):
    app = faust.App("test-serial", broker="memory://", store="memory://", datadir=str(tmp_path))
    io = Stage(app, Settings(), "deliver", serial_key=lambda raw: raw.split(b"#")[0].decode())
    producer = _HeldProducer()
    io._producer = producer  # type: ignore[assignment]
    started: list[bytes] = []

    async def handle(raw: bytes) -> Outputs:
        started.append(raw)
        out = io.outputs()
        out.send("events", "m1", raw)
        return out

    first = asyncio.ensure_future(io.process(b"m1#1", handle))
    second = asyncio.ensure_future(io.process(b"m1#2", handle))
    other = asyncio.ensure_future(io.process(b"m2#1", handle))
    for _ in range(5):
        await _real_sleep(0)
    # The second copy of m1 waits for the first's acks; another key does not.
    assert started == [b"m1#1", b"m2#1"]
    producer.ack_all()
    await asyncio.wait_for(asyncio.gather(first, other), 1)
    for _ in range(5):
        await _real_sleep(0)
    assert started == [b"m1#1", b"m2#1", b"m1#2"]
    producer.ack_all()
    await asyncio.wait_for(second, 1)
    assert io._serial == {}


def test_outputs_extend_keeps_order_and_the_retry():
    a, b = Outputs("scan"), Outputs("scan")
    a.send("clean", "k1", b"1")
    b.event("m1", "scanned", ["x@y.test"])
    b.retry_later("later")
    a.extend(b)
    assert [t for t, _, _, _ in a.records] == ["clean", "events"]
    assert a.retry == "later" and a.states() == [("scanned", ["x@y.test"])]


class _Msg:
    """The part of a Faust message a local store reads: its partition."""

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.topic = "input"


async def test_table_writes_and_reads_in_rocksdb_are_faust_s_own_bytes(tmp_path):
    # The local store is written and read with orjson, bypassing Faust's serializer
    # registry: a value must read back the same through Faust's own path, a value
    # Faust wrote must read back through ours, and the store's key must be the
    # changelog record's, which a restore replays byte for byte.
    from faust.stores.base import SerializedStore

    from streams.runtime import table_get

    app = faust.App("test-raw", broker="memory://", store="rocksdb://", datadir=str(tmp_path))
    table = app.Table("status", partitions=2, schema=JSON_TABLE)
    table.partition_for_key = lambda key: 1  # outside a stream; the event names the partition
    io = Stage(app, Settings(), "status")
    producer = _FlakyProducer(fail=0)
    io._producer = producer  # type: ignore[assignment]
    ev = _Ev(b"")
    ev.message = _Msg(1)  # type: ignore[attr-defined]
    value = {"id": "m1", "recipients": {"a@x.test": {"state": "delivered", "ts": 1.5}}, "note": "é"}
    store = table.data
    assert isinstance(store, SerializedStore)  # the fast path, not the fallback

    await io.table_write(table, "m1", value, ev)  # type: ignore[arg-type]

    with _acting_for(ev):  # type: ignore[arg-type]
        assert store["m1"] == value  # Faust's own read: its key encoding, its JSON
        store["m2"] = {"by": "faust"}
        assert store._encode_key("m1") == producer.acked[0][1]  # the changelog's key
    assert table_get(table, "m1", ev) == value  # type: ignore[arg-type]
    assert table_get(table, "m2", ev) == {"by": "faust"}  # type: ignore[arg-type]
    assert table_get(table, "absent", ev) is None  # type: ignore[arg-type]
    assert orjson.loads(producer.acked[0][2]) == value and producer.acked[0][3] == 1
    other = _Ev(b"")
    other.message = _Msg(0)  # type: ignore[attr-defined]
    assert table_get(table, "m1", other) is None  # type: ignore[arg-type]  # another partition's store


async def test_changelog_acks_mark_the_store_once_per_partition_with_the_highest_offset(stage):
    from faust.types import TP

    io, _, _ = stage
    marks: list[tuple[TP, int]] = []

    class Store:
        def set_persisted_offset(self, tp: TP, offset: int) -> None:
            marks.append((tp, offset))

    store, a, b = Store(), TP("status-changelog", 0), TP("status-changelog", 1)
    for tp, offset in ((a, 3), (a, 5), (b, 1), (a, 4)):  # acks of one delivery-report poll
        io._persist(store, tp, offset)
    assert marks == []  # not one store write per ack
    await asyncio.sleep(0)
    assert sorted(marks) == [(a, 5), (b, 1)]
    io._persist(store, a, 6)  # the next poll's acks are marked again
    await asyncio.sleep(0)
    assert marks[-1] == (a, 6)


class _FlowingApp:
    class flow_control:  # noqa: N801 (Faust's attribute)
        @staticmethod
        def is_active() -> bool:
            return True


async def test_held_changelogs_go_once_per_key_and_the_batches_are_acked_only_after(stage, monkeypatch):
    # The status stage's hold: each key's latest value once per round, a refused send
    # kept for the next round, and no batch acked before its round is acknowledged.
    io, ledger, producer = stage
    acked: list[list] = []
    monkeypatch.setattr("streams.feed.ack", lambda app, events: acked.append(list(events)))
    io._hold = True
    for value in (["a"], ["a", "b"]):
        await io.table_write(ledger, "m1", value)  # done at once: nothing sent yet
    await io.table_write(ledger, "m2", ["x"])
    assert producer.acked == [] and ledger.data["m1"] == ["a", "b"]  # the local store has it now
    held: list[list] = [["batch 1"]]
    sending: list[list] = []
    flusher = asyncio.ensure_future(io._flush_held(_FlowingApp(), 0.05, held, sending))  # type: ignore[arg-type]
    try:
        for _ in range(100):  # the first send is refused (fail=1): a second round sends it
            await asyncio.sleep(0.02)
            if acked:
                break
        assert acked == [["batch 1"]]
        assert sorted((k, orjson.loads(v)) for _, k, v, _ in producer.acked) == [
            (b'"m1"', ["a", "b"]), (b'"m2"', ["x"])]
        assert held == [] and sending == [] and io._dirty == {}
        await io.table_write(ledger, "m1", ["a", "b", "c"])
        held.append(["batch 2"])
        for _ in range(50):
            await asyncio.sleep(0.02)
            if len(acked) == 2:
                break
        assert acked[1] == ["batch 2"] and orjson.loads(producer.acked[-1][2]) == ["a", "b", "c"]
    finally:
        flusher.cancel()
