"""The stage runtime: a handler returns its outputs as data; the runtime performs them.

A stage's handler parses a record, decides, and returns an `Outputs`: the records
to send, the status events, the records parked on ``errors``, the table writes. It
may await reads (the object store, scanners, SMTP, DNS) but produces nothing
itself. The runtime (`Stage`) then applies the table writes to the local store,
sends every record and changelog record through its librdkafka producer
(acks=all), waits for every acknowledgement, and only then lets the input be
acked. So a handler cannot forget an output or ack its input early, a crash at any
point means the input is read again, never that an output is missing
(at-least-once; the stages downstream are idempotent per id), and a handler is a
function from a record to data, tested without Kafka.

Order: a record's table writes are sent first (the delivery ledger's entry before
its events), then its records in the order the handler added them. Table writes
are applied to the local store the moment the handler returns, with no wait in
between, so the next record's handler reads them (a rate window's count, a mailbox
page, a ledger entry).

`Stage.run_batches` feeds a stage its input in batches (`streams.feed.batches`,
straight from Faust's consumer, in place of Faust's ``take_events``):
the records of a batch run concurrently, so their outputs leave in a few produce
requests instead of one each, and the batch's offsets are acked only after every
record of it is done. A batch's records start in offset order and a handler's
work up to its first wait runs uninterrupted, its writes applied before the next
record's handler starts, which keeps per-key order for the stages that read and
write a table.

A record that does not parse is a poison pill: it goes to ``errors`` with a
reason and the stage carries on. A transient failure (object store, scanner,
network, a refused send) redoes the record with backoff for as long as it lasts,
so lag grows instead of mail being dropped; so does `Outputs.retry_later`, after
the outputs it came with are acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar, copy_context
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import faust
import orjson
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
from faust.exceptions import PartitionsMismatch
from faust.serializers import codecs
from faust.stores.base import SerializedStore
from faust.streams import _current_event, current_event
from faust.types import TP, AppT, EventT

from mailflow import metrics
from mailflow.config import Settings
from mailflow.kafka_io import AsyncProducer, BrokerUnavailable
from mailflow.objstore import get_body
from schemas.mail import MailRecord
from schemas.records import ErrorRecord, Event, Message, PoisonPill
from streams import feed
from streams.app import topic
from streams.events import EventBatcher
from streams.faust_compat import MAIL_PATH, FetchPolicy, run_eagerly, set_fetch_policy
from streams.topics import full_name, group_id

log = logging.getLogger("mailflow.stage")

# Up to BATCH_MAX records per batch, and a batch waits at most BATCH_WITHIN for
# more: under load batches fill at once; when idle a record waits at most 20 ms.
BATCH_MAX = 256
BATCH_WITHIN = 0.02

# How often a stage asks again how many partitions ``events`` has (`streams.events`).
EVENT_PARTITIONS_EVERY = 60.0

# Tables: string keys, JSON values. (Faust encodes these keys as JSON strings; which
# partition a write goes to is the input record's, see `Stage.table_write`.)
JSON_TABLE: faust.Schema = faust.Schema(key_type=str, key_serializer="raw", value_serializer="json")


class RetryLater(Exception):
    """`Outputs.retry_later`: the record's outputs are out; try the record again later."""


# Failures that are the world's, not the record's: wait and try again.
# PartitionsMismatch: on a fresh broker a table's new changelog topic can be missing
# from the client's metadata for a moment; it resolves with the next refresh.
# KafkaConnectionError, KafkaTimeoutError: a windowed table's changelog send (Faust's
# aiokafka producer) that the broker did not take.
TRANSIENT = (OSError, TimeoutError, asyncio.TimeoutError, ConnectionError, BrokerUnavailable,
             PartitionsMismatch, KafkaConnectionError, KafkaTimeoutError, RetryLater)

OnAck = Callable[[int, int], None]


@dataclass(slots=True)
class Outputs:
    """What one record (or one batch, for a stage that takes batches whole) produces.

    Built by the handler, performed by `Stage`: nothing here talks to Kafka.
    ``records`` are ``(topic short name, key, value, on_ack)`` in the order added;
    ``writes`` are ``(table, key, value, event)``; ``windows`` are ``(windowed
    table, key, event, amount)``; ``retry`` is set by `retry_later`.
    """

    stage: str
    records: list[tuple[str, bytes | None, bytes | None, OnAck | None]] = field(default_factory=list)
    writes: list[tuple[Any, str, Any, EventT | None]] = field(default_factory=list)
    windows: list[tuple[Any, str, EventT, int]] = field(default_factory=list)
    retry: str | None = None

    def send(self, topic_short: str, key: str | bytes | None, value: bytes | None,
             on_ack: OnAck | None = None) -> None:
        """A record for topic `topic_short` (``clean``, ``retry.2``...); a None value
        is a tombstone. `on_ack(partition, offset)` runs once the broker took it (the
        deliver stage's own suppression entries are known before they are read back)."""
        k = key.encode() if isinstance(key, str) else key
        self.records.append((topic_short, k, value, on_ack))

    def event(self, msg_id: str, state: str, recipients: Iterable[str] | None = None,
              detail: dict[str, Any] | None = None, sender: str | None = None,
              ts: float | None = None) -> None:
        """A status event (``events``, key: message id) from this stage; the runtime
        sends a turn's events for one partition as one record (`streams.events`)."""
        ev = Event(id=msg_id, state=state, stage=self.stage, ts=ts or time.time(),
                   recipients=list(recipients) if recipients is not None else None,
                   detail=detail or {}, sender=sender)
        self.send("events", msg_id, ev.to_json())

    def park(self, reason: str, state: str, raw: bytes | None, msg_id: str | None = None,
             detail: str = "") -> None:
        """The record parked on ``errors`` with a reason (``mailflow replay`` puts it back)."""
        rec = ErrorRecord(stage=self.stage, reason=reason, state=state, detail=detail, id=msg_id,
                          record=raw.decode("utf-8", "replace") if raw is not None else None)
        self.send("errors", msg_id, rec.to_json())

    def write(self, table: Any, key: str, value: Any, event: EventT | None = None) -> None:
        """``table[key] = value`` (a table made with `JSON_TABLE`), in the partition of
        `event`, by default the record's; see `Stage.table_write`."""
        self.writes.append((table, key, value, event))

    def writing(self, table: Any) -> TableWrites:
        """A mapping over `table` for code written against one (`mailflow.rules.mailbox`):
        reads see this record's own writes first, writes become `write`."""
        return TableWrites(self, table)

    def window_add(self, table: Any, key: str, event: EventT, amount: int = 1) -> None:
        """``table[key][event] += amount`` on a Faust windowed table made with
        `windowed_table`, in the window of `event`'s timestamp."""
        self.windows.append((table, key, event, amount))

    def retry_later(self, reason: str) -> None:
        """Perform these outputs, wait for their acks, then retry the record with
        backoff (a record waiting on a scanner says so once, then waits)."""
        self.retry = reason

    def extend(self, other: Outputs) -> None:
        """Add `other`'s outputs after these."""
        self.records += other.records
        self.writes += other.writes
        self.windows += other.windows
        if other.retry is not None and self.retry is None:
            self.retry = other.retry

    def sent(self, topic_short: str) -> list[tuple[bytes | None, bytes | None]]:
        """The (key, value) of each record for `topic_short`, in order (for tests)."""
        return [(k, v) for t, k, v, _ in self.records if t == topic_short]

    def states(self) -> list[tuple[str, list[str] | None]]:
        """Each status event's (state, recipients), in order (for tests)."""
        return [(e["state"], e["recipients"])
                for e in (orjson.loads(v or b"") for _, v in self.sent("events"))]


Handler = Callable[..., Awaitable[Outputs]]


def table_get(table: Any, key: str, event: EventT | None = None) -> Any:
    """``table.get(key)`` for a handler (a table made with `JSON_TABLE`): the local
    store's value in the partition of `event` (by default the current event's), None
    if absent.

    Read as `Stage.table_write` wrote it: the store's bytes decoded with orjson.
    Faust's ``table.get`` reads the store twice (a membership test, then the value),
    searches every partition's store when no event is current (a whole batch), and
    decodes through its serializer registry: a fifth of the status stage's CPU
    (docs/BENCHMARKS.md). Web views, outside any record, keep ``table.get``.
    """
    if event is None:
        event = current_event()
    store = table.data
    with _acting_for(event):
        if not isinstance(store, SerializedStore):  # the in-memory store of unit tests
            return store.get(key)
        raw = store._get(codecs.dumps(table.key_serializer, key))
    return None if raw is None else orjson.loads(raw)


class TableWrites(MutableMapping[str, Any]):
    """`Outputs.writing`: a table as a mapping whose writes are an `Outputs`'s."""

    def __init__(self, out: Outputs, table: Any) -> None:
        self.out = out
        self.table = table
        self._own: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._own:
            return self._own[key]
        value = table_get(self.table, key)
        return default if value is None else value

    def __setitem__(self, key: str, value: Any) -> None:
        self._own[key] = value
        self.out.write(self.table, key, value)

    def __delitem__(self, key: str) -> None:
        raise TypeError("stages never delete table keys")

    def __iter__(self) -> Iterator[str]:
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)


async def all_settled(pending: Iterable[Awaitable[Any]]) -> None:
    """Wait for every one of `pending`, then raise the first failure, if any (unlike
    ``gather``, which raises at the first and leaves the rest running)."""
    first = await _first_failure(pending)
    if first is not None:
        raise first


async def _first_failure(pending: Iterable[Awaitable[Any]]) -> BaseException | None:
    # One after the other, not ``gather``: the outputs are futures already on their way
    # (produce acks, changelog sends), so waiting on each in turn takes as long as the
    # slowest, without gather's task per coroutine and its callbacks per record.
    first: BaseException | None = None
    for p in pending:
        try:
            await p
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 (the first failure is raised by the caller)
            if first is None:
                first = exc
    return first


@contextmanager
def _acting_for(event: EventT | None) -> Iterator[None]:
    """Faust's "current event" set to `event` (if any) for a table access: a table's
    partition, and the local store's, are the current event's."""
    token = _current_event.set(weakref.ref(event)) if event is not None else None
    try:
        yield
    finally:
        if token is not None:
            _current_event.reset(token)


# The changelog sends of `_AckedTable` writes made while the runtime applies a window write.
_CHANGELOG_ACKS: ContextVar[list[Awaitable[Any]] | None] = ContextVar("changelog_acks", default=None)


class _AckedTable(faust.Table):
    """A Faust table whose changelog sends the runtime awaits before the commit.

    For writes that go through Faust's own table machinery, a windowed table's
    ``+=`` (window keys, their encoding and expiry are Faust's), where
    `Stage.table_write` does not fit. Faust sends the changelog record and forgets
    it (see `Stage.table_write` for why that is not durable before the commit);
    here each send's future also joins the list in `_CHANGELOG_ACKS`, which the
    runtime sets around the window writes of an `Outputs` and awaits with the
    record's other outputs.

    A table made by `Stage.windowed_table` knows its `stage`: the changelog record
    of a window write the runtime applies goes out through the stage's librdkafka
    producer (`Stage._send_window_changelog`), the key and value encoded by the
    changelog topic's own schema, as Faust's send would encode them. Faust's path,
    its pure-Python producer, was a fifth of the rate limiter's CPU (py-spy,
    session 11). Other sends (a window's expiry) stay Faust's.
    """

    stage: Stage | None = None

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        fut = super().send_changelog(*args, **kwargs)
        acks = _CHANGELOG_ACKS.get()
        if acks is not None:
            acks.append(fut)
        return fut

    def on_key_set(self, key: Any, value: Any) -> None:
        # Faust's on_key_set with the send made by the stage; the key's expiry and the
        # sensors as Faust does them (`streams.faust_compat` checks these names).
        acks = _CHANGELOG_ACKS.get()
        partition = self.partition_for_key(key)
        fut = None
        if acks is not None and self.stage is not None and partition is not None:
            fut = self.stage._send_window_changelog(self, partition, key, value)
        if fut is None or acks is None or partition is None:
            super().on_key_set(key, value)
            return
        acks.append(fut)
        self._maybe_set_key_ttl(key, partition)
        self._sensor_on_set(self, key, value)


def windowed_table(app: faust.App, name: str, window: float, expires: float,
                   **kwargs: Any) -> Any:
    """A tumbling windowed table (``app.Table(name, **kwargs).tumbling(window,
    expires=expires).relative_to_stream()``) whose writes, made through
    `Outputs.window_add`, are acknowledged before the input commits."""
    table = _AckedTable(app, name=name, beacon=app.tables.beacon, **kwargs)
    app.tables.add(table)
    return table.tumbling(window, expires=expires).relative_to_stream()


@contextmanager
def _acked_writes() -> Iterator[list[Awaitable[Any]]]:
    acks: list[Awaitable[Any]] = []
    token = _CHANGELOG_ACKS.set(acks)
    try:
        yield acks
    finally:
        _CHANGELOG_ACKS.reset(token)


class Stage:
    """One stage's runtime: its topics, its producer, and the loops that run its handler.

    ``Stage(app, settings, name)``, then `agent` with the input topic and the handler
    (``handler(raw) -> Outputs``, or ``handler(raw, event=...)`` with `with_event`).
    `serial_key(raw)`, if given, names records that must not run at once in this
    process (see `process`). `fetch` is what the stage's consumer asks the broker
    for (`streams.faust_compat.FetchPolicy`): the mail's stages keep `MAIL_PATH`,
    records as soon as they are there.
    """

    def __init__(self, app: faust.App, settings: Settings, name: str, linger_ms: int = 5,
                 serial_key: Callable[[Any], str | None] | None = None,
                 fetch: FetchPolicy = MAIL_PATH) -> None:
        self.app = app
        set_fetch_policy(app, fetch)
        self.settings = settings
        self.name = name
        self.linger_ms = linger_ms
        self.serial_key = serial_key
        self._topics: dict[str, faust.TopicT] = {}
        self._full: dict[str, str] = {}
        self._producer: AsyncProducer | None = None
        # Table writes whose changelog record failed: (id(table), key) -> (table, key,
        # partition, the event that wrote it); sent again by `resync` before any
        # record's next attempt.
        self._unsynced: dict[tuple[int, str], tuple[Any, str, int, EventT | None]] = {}
        self._changelogs: dict[int, str] = {}  # id(table) -> its changelog topic
        # With held changelogs (`run_whole_batches(hold=...)`): table writes applied
        # to the local store whose changelog record waits for `_flush_held`, in the
        # same form as `_unsynced`.
        self._hold = False
        self._held_agent = False
        self._dirty: dict[tuple[int, str], tuple[Any, str, int, EventT | None]] = {}
        # (id(store), changelog partition) -> (store, tp, offset) to mark (`_persist`)
        self._persisting: dict[tuple[int, TP], tuple[Any, TP, int]] = {}
        # serial key -> [lock, how many records hold or wait for it]
        self._serial: dict[str, list[Any]] = {}
        # input topic (short name) -> its handler, as `agent` registered it (tests
        # call handlers directly: a handler is a function from a record to Outputs)
        self.handlers: dict[str, Handler] = {}
        # Label lookups cost a lock and a dict walk per call: once per stage instead.
        self._handled = {o: metrics.STAGE_MESSAGES.labels(name, o)
                         for o in ("ok", "poison", "failed", "retried")}
        self._seconds = metrics.STAGE_SECONDS.labels(name)
        self.events = EventBatcher(lambda t, k, v, p: self.producer.produce(t, k, v, partition=p),
                                   full_name(settings, "events"))
        # librdkafka's idempotent producer holds its first record until it has its
        # producer id, about 0.5 s after it is made: made as the worker starts, so the
        # first message after a start does not wait 0.5 s at each stage (bench/idle.py).
        app.task(self._start_producer)

    async def _start_producer(self) -> None:
        self.producer  # noqa: B018 (made now, not on the first record)
        await self._learn_event_partitions()

    async def _learn_event_partitions(self) -> None:
        # Until `events`' partition count is known, each event is a record of its own
        # (`streams.events`); asked again now and then, for partitions an operator added.
        loop = asyncio.get_running_loop()
        topic = self.events.topic
        while True:
            n = await loop.run_in_executor(None, self.producer.partition_count, topic)
            if n is not None:
                self.events.partitions = n
            await asyncio.sleep(EVENT_PARTITIONS_EVERY if n is not None else 1.0)

    # --- declaring ---------------------------------------------------------------

    def outputs(self) -> Outputs:
        """An empty `Outputs` of this stage."""
        return Outputs(self.name)

    def topic(self, short: str) -> faust.TopicT:
        if short not in self._topics:
            self._topics[short] = topic(self.app, self.settings, short)
        return self._topics[short]

    def agent(self, input_short: str, handler: Handler, mode: str = "batches",
              concurrency: int = 1, with_event: bool = False, name: str | None = None,
              hold: float = 0.0) -> Any:
        """Register the stage's Faust agent on `input_short`, running `handler`.

        `mode`: ``batches`` (`run_batches`: a batch's records concurrently),
        ``each`` (`process`, one record at a time per actor; `concurrency` actors),
        ``whole`` (`run_whole_batches`: a batch is one handler call, for a stage that
        folds several records into one table write; `hold`: its changelog records
        held and sent every so many seconds). The agent's name is
        the stage's group name (`streams.topics.group_id`) unless `name` says
        otherwise: the consumer group's agent.
        """
        agent_name = name or group_id(self.settings, self.name)

        async def run(stream: faust.StreamT) -> None:
            if mode == "batches":
                await self.run_batches(stream, handler, with_event=with_event)
            elif mode == "whole":
                await self.run_whole_batches(stream, handler, hold=hold)
            else:
                async for value in stream:
                    await self.process(value, handler)

        if mode not in ("batches", "each", "whole"):
            raise ValueError(f"unknown mode {mode!r}")
        if hold and mode != "whole":
            raise ValueError("hold is for mode='whole'")
        if (hold and self.handlers) or self._held_agent:
            # The hold covers every table write of the stage, and only its own
            # agent's input waits for the held changelog records.
            raise ValueError("a stage whose changelog records are held has that one agent")
        self._held_agent = bool(hold)
        self.handlers[input_short] = handler
        run.__name__ = run.__qualname__ = agent_name.replace(".", "_").replace("-", "_")
        return self.app.agent(self.topic(input_short), name=agent_name, concurrency=concurrency)(run)

    # --- reading -----------------------------------------------------------------

    async def body(self, msg: MailRecord | Message) -> bytes:
        """The message's body, inline or from the object store (any mail record)."""
        if msg.body is not None:
            return msg.body
        assert msg.body_ref is not None
        return await get_body(self.settings.object_store_url, msg.body_ref)

    # --- performing outputs ------------------------------------------------------

    @property
    def producer(self) -> AsyncProducer:
        # Outputs go through librdkafka (C), not Faust's aiokafka producer: same
        # acks=all guarantee at a fraction of the CPU per record. Faust keeps the
        # consumer, the tables and their changelogs.
        if self._producer is None:
            extra: dict[str, Any] = {"linger.ms": self.linger_ms}  # not an identifier: by dict
            self._producer = AsyncProducer(self.settings.kafka_bootstrap, timeout_ms=30000, **extra)
        return self._producer

    def perform(self, out: Outputs, event: EventT | None = None) -> list[Awaitable[Any]]:
        """Apply `out`'s table writes to the local stores and send everything; the
        acknowledgements to wait for (a `retry_later` last, as a failure)."""
        acks: list[Awaitable[Any]] = []
        for table, key, value, ev in out.writes:
            acks.append(self.table_write(table, key, value, ev or event))
        if out.windows:
            with _acked_writes() as changelog:
                for table, key, ev, amount in out.windows:
                    with _acting_for(ev):
                        window_set = table[key][ev]
                        window_set += amount
            acks += changelog
        produce = self.producer.produce
        full = self._full
        for short, k, v, on_ack in out.records:
            if short == "events" and k is not None and v is not None:
                fut = self.events.add(k, v)  # a record per partition per turn of the loop
            else:
                name = full.get(short)
                if name is None:
                    name = full[short] = full_name(self.settings, short)
                fut = produce(name, k, v)  # type: ignore[arg-type]  # a None value: a tombstone
            if on_ack is not None:
                fut.add_done_callback(partial(_acked, on_ack))
            acks.append(fut)
        if out.retry is not None:
            later: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            later.set_exception(RetryLater(out.retry))
            acks.append(later)
        return acks

    def table_write(self, table: Any, key: str, value: Any, event: EventT | None = None
                    ) -> Awaitable[Any]:
        """``table[key] = value``, returning the changelog record's ack.

        A plain ``table[key] = value`` queues the changelog record in Faust's producer
        buffer and forgets it, and Faust's pre-commit flush of that buffer is best
        effort (it gives up after 0.1 s without progress), so an input offset can be
        committed while its table writes are still in memory; a kill -9 then loses
        them for good. Awaited, the commit waits.

        The changelog record goes out through the stage's librdkafka producer, with
        the key encoded by the table's own codec and a JSON value, not through
        Faust's pure-Python one, which costs a third of the status stage's
        CPU. The local store (RocksDB) gets the same bytes as the changelog, encoded
        once with orjson, not again through Faust's serializer registry (`table_get`
        reads them back the same way). As Faust's own write does, the local store
        then records the offset it holds data up to, so a clean restart replays only
        the changelog's tail.

        The write belongs to the input record's partition (Faust's rule: a replica
        that owns an input partition owns that table partition, changelog and local
        store): `event`'s, or by default the current event's.
        """
        if event is None:
            event = current_event()
        store = table.data
        key_bytes = codecs.dumps(table.key_serializer, key)
        value_bytes = orjson.dumps(value)
        with _acting_for(event):
            partition = table.partition_for_key(key)
            if isinstance(store, SerializedStore):
                store._set(key_bytes, value_bytes)  # what Faust's store[key] = value ends in
            else:  # the in-memory store of unit tests keeps objects
                store[key] = value
        if self._hold:
            self._dirty[(id(table), key)] = (table, key, partition, event)
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return self._send_changelog(table, key, key_bytes, value_bytes, partition, event)

    def _send_changelog(self, table: Any, key: str, key_bytes: bytes, value_bytes: bytes,
                        partition: int, event: EventT | None) -> asyncio.Future[tuple[int, int]]:
        # The key exactly as Faust encodes it (its codec, JSON for these tables): a
        # changelog is compacted and restored by key bytes. The value is any JSON.
        name = self._changelogs.get(id(table))
        if name is None:
            name = self._changelogs[id(table)] = table.changelog_topic.get_topic_name()
        fut = self.producer.produce(name, key_bytes, value_bytes, partition=partition)
        store = table.data

        def settled(f: asyncio.Future[tuple[int, int]]) -> None:
            if f.cancelled() or f.exception() is not None:
                # The local store has the value and the changelog may not. The
                # record's retry will not write it again (its handler reads the local
                # store and finds the work done), so `resync` sends it first; with
                # held changelogs, the next `_flush_held` does.
                entry = (table, key, partition, event)
                if self._hold:
                    self._dirty.setdefault((id(table), key), entry)
                else:
                    self._unsynced[(id(table), key)] = entry
            else:
                self._persist(store, TP(name, partition), f.result()[1])

        fut.add_done_callback(settled)
        return fut

    def windowed_table(self, name: str, window: float, expires: float, **kwargs: Any) -> Any:
        """`windowed_table` on this stage's app, its changelog records sent through this
        stage's producer (see `_AckedTable`)."""
        wrapper = windowed_table(self.app, name, window, expires, **kwargs)
        wrapper.table.stage = self
        return wrapper

    def _send_window_changelog(self, table: Any, partition: int, key: Any, value: Any
                               ) -> asyncio.Future[tuple[int, int]] | None:
        # Encoded as Faust's Topic.send_soon encodes them (the changelog topic's schema),
        # so Faust's recovery reads them back as its own. A schema that adds headers
        # needs Faust's send, which carries them: None, and Faust sends it.
        topic = table.changelog_topic
        key_bytes, headers = topic.prepare_key(key, table.key_serializer, None, {})
        value_bytes, headers = topic.prepare_value(value, table.value_serializer, None, headers)
        if headers:
            return None
        name = self._changelogs.get(id(table))
        if name is None:
            name = self._changelogs[id(table)] = topic.get_topic_name()
        fut = self.producer.produce(name, key_bytes, value_bytes, partition=partition)
        store = table.data

        def settled(f: asyncio.Future[tuple[int, int]]) -> None:
            # A failure fails the record's outputs: it is redone, as with Faust's send.
            if not f.cancelled() and f.exception() is None:
                self._persist(store, TP(name, partition), f.result()[1])

        fut.add_done_callback(settled)
        return fut

    def _persist(self, store: Any, tp: TP, offset: int) -> None:
        # The local store's "data up to this changelog offset" mark, one store write
        # per partition for all the acks that arrive together (a RocksDB put each
        # was a twentieth of the status stage's CPU). Written a moment later it only
        # means a restart replays a little more of the changelog.
        if not self._persisting:  # the first mark since the last write: schedule one
            asyncio.get_running_loop().call_soon(self._write_persisted)
        k = (id(store), tp)
        prev = self._persisting.get(k)
        if prev is None or offset > prev[2]:
            self._persisting[k] = (store, tp, offset)

    def _write_persisted(self) -> None:
        pending, self._persisting = self._persisting, {}
        for store, tp, offset in pending.values():
            store.set_persisted_offset(tp, offset)

    async def resync(self) -> None:
        """Send again, with the key's current local value, every table write whose
        changelog record the broker did not take, and wait for the acks.

        Without this, a write lost while the broker is away stays in this replica's
        local store only: the record's retry finds its work done and writes nothing,
        its offset is committed, and a replica that later restores the partition from
        the changelog lacks it (a delivery ledger entry, hence a second
        send of a replayed record; a mailbox append). The current value includes
        the lost write, and is never older than one already sent: every write to a
        key of a partition this replica owns is made here, in order. Raises the
        first failure, after all have settled (each failure is kept again)."""
        while self._unsynced:
            entries = list(self._unsynced.values())
            self._unsynced.clear()
            await all_settled(self._send_current(entries))

    def _send_current(self, entries: Iterable[tuple[Any, str, int, EventT | None]]
                      ) -> list[asyncio.Future[tuple[int, int]]]:
        """A changelog record for each (table, key, partition, event) with the key's
        current local value (`resync`, `_flush_held`), skipping a key whose partition's
        store is no longer here (not this replica's any more)."""
        sends = []
        for table, key, partition, event in entries:
            value = table_get(table, key, event)  # the event's partition
            if value is None:
                continue
            sends.append(self._send_changelog(table, key, codecs.dumps(table.key_serializer, key),
                                              orjson.dumps(value), partition, event))
        return sends

    # --- the loops ---------------------------------------------------------------

    async def run_batches(self, stream: faust.StreamT, handler: Handler,
                          max_: int = BATCH_MAX, within: float = BATCH_WITHIN,
                          with_event: bool = False) -> None:
        """Handle the stream a batch at a time; see the module docstring.

        `handler(raw)`, or `handler(raw, event)` with `with_event` (for the Kafka
        timestamp or a windowed table, which outside Faust's own per-event loop
        must be told the event)."""
        async for events in feed.batches(stream, max_, within):
            await self.process_batch(events, handler, with_event)

    async def run_whole_batches(self, stream: faust.StreamT, handler: Handler,
                                max_: int = BATCH_MAX, within: float = BATCH_WITHIN,
                                hold: float = 0.0) -> None:
        """Hand each batch to `handler(events)` whole (a list of Faust events), one
        batch at a time; the batch is redone whole on a failure.

        With `hold` (seconds), the changelog records of the batches' table writes
        are held and sent every `hold` seconds, one per key written meanwhile, and
        the batches are acked only once those records are acknowledged: a key
        written by several batches in that time costs one changelog record (Kafka
        Streams' record cache and commit interval). The local store has each write
        at once, so reads (a table's web view) see it at once; what waits is the
        input's commit, so the stage's lag, and a crash meanwhile means its held
        input is read again (the handler must be idempotent per record, as any
        at-least-once handler). The handler's records (parked poison) are sent and
        awaited per batch as without it."""
        if not hold or not feed.supported(stream):
            async for events in feed.batches(stream, max_, within):
                await self.process(list(events), handler)
            return
        held: list[list[EventT]] = []  # handled, their changelog records not yet sent
        sending: list[list[EventT]] = []  # handled, their changelog records on the way
        self._hold = True
        flusher = asyncio.ensure_future(self._flush_held(stream.app, hold, held, sending))
        try:
            async for events in feed.batches(stream, max_, within, hold=True):
                try:
                    await self.process(list(events), handler)
                except BaseException:
                    feed.abandon(stream.app, events)
                    raise
                held.append(events)
        finally:
            flusher.cancel()
            for events in held + sending:
                feed.abandon(stream.app, events)
            held.clear()
            sending.clear()
            self._hold = False

    async def _flush_held(self, app: AppT, every: float, held: list[list[EventT]],
                          sending: list[list[EventT]]) -> None:
        """Every `every` seconds (at once while a rebalance waits for the stage's
        records to be acked), send the held changelog records, then ack the batches
        handled before they were taken. A send that fails puts its key back among
        the held ones: the batches wait for the next round that sends it."""
        flowing = app.flow_control.is_active
        step = min(0.1, every)
        waited = 0.0
        delay = 0.2
        while True:
            await asyncio.sleep(step)
            waited += step
            if waited < every and flowing():
                continue
            waited = 0.0
            if not held and not self._dirty and not sending:
                continue
            sending += held
            held.clear()
            dirty, self._dirty = self._dirty, {}
            try:
                failure = await _first_failure(self._send_current(dirty.values()))
            except Exception as exc:  # noqa: BLE001 (a flusher that died would stall the stage)
                for k, entry in dirty.items():
                    self._dirty.setdefault(k, entry)
                failure = exc
            if failure is not None:
                log.warning("%s: changelog records not sent, trying again in %.1fs: %r",
                            self.name, delay, failure)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                waited = every  # the next round at once
                continue
            delay = 0.2
            for events in sending:
                feed.ack(app, events)
            sending.clear()

    async def _handle_and_perform(self, handler: Handler, ev: EventT, with_event: bool
                                  ) -> list[Awaitable[Any]]:
        # The outputs are performed the moment the handler returns, with no wait in
        # between: a handler that finished without waiting has its table writes in
        # the local store before the batch's next handler starts.
        out = await (handler(ev.value, event=ev) if with_event else handler(ev.value))
        return self.perform(out, ev)

    async def process_batch(self, events: list[EventT], handler: Handler,
                            with_event: bool = False) -> None:
        """Run one batch: each record's handler and its outputs, then one wait for
        every acknowledgement of the batch; a record that failed anywhere is redone
        through `process` (its retries, parking and poison pills), concurrently with
        the other failures. Returns once every record is done, so the batch's
        offsets may be acked.

        Each handler starts at once, in offset order, in its own context (as a task
        of its own would), with Faust's current event set to its record; one that
        waits goes on as a task. Most records need none: handing a record on does
        not wait, so a batch costs one wait on its acks instead of a task, a gather
        and a wake-up per record."""
        if self._unsynced or self.serial_key is not None:
            # Table writes to send again first, or records that must not overlap:
            # `process` sees to both, per record.
            await asyncio.gather(*(self._process_event(ev, handler, with_event) for ev in events))
            return
        started = time.perf_counter()
        runs = []
        for ev in events:
            ctx = copy_context()
            ctx.run(_current_event.set, weakref.ref(ev))
            try:
                runs.append(run_eagerly(self._handle_and_perform(handler, ev, with_event), ctx))
            except Exception as exc:  # noqa: BLE001 (redone below, where it is judged)
                runs.append((True, exc))
        results: list[list[Awaitable[Any]] | BaseException] = []
        for done, result in runs:
            if not done:
                try:
                    result = await result
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    result = exc
            results.append(result)
        failed = []
        for ev, acks in zip(events, results, strict=True):
            failure = acks if isinstance(acks, BaseException) else await _first_failure(acks)
            if failure is not None:
                failed.append(ev)
        if failed:
            # A failed table write is known to `resync` by now: every output settled.
            await asyncio.gather(*(self._process_event(ev, handler, with_event) for ev in failed))
        done_n = len(events) - len(failed)
        if done_n:
            self._handled["ok"].inc(done_n)
            metrics.observe_many(self._seconds, time.perf_counter() - started, done_n)

    async def _process_event(self, ev: EventT, handler: Handler, with_event: bool) -> None:
        # As its own task, Faust's current event is this record's, as in Faust's own
        # per-event loop, so table writes land in the record's partition.
        _current_event.set(weakref.ref(ev))
        await self.process(ev.value, partial(handler, event=ev) if with_event else handler)

    async def process(self, raw: Any, handler: Handler) -> None:
        """Run `handler` on one record's value, or on a list of Faust events (parked
        together on a failure), and perform its outputs, until every one is
        acknowledged, or the record is parked, or it is poison.

        With `serial_key`, records of one key run one at a time, from the handler's
        start until its outputs are applied and acknowledged. The deliver stage's
        reason: two live copies of one (message, domain) record can exist (a
        replayed input whose first run had already deferred it to a retry topic, or
        a retry copy arriving while its replayed original is still in flight); both
        hash to the same partition, so to this process, and two actors could take
        them at once and both find the ledger empty, and both send. One at a time,
        the second reads the first one's ledger entries."""
        key = None
        if self.serial_key is not None:
            try:
                key = self.serial_key(raw)
            except Exception:  # noqa: BLE001 (unparseable: the handler parks it, no lock needed)
                key = None
        if key is None:
            await self._process(raw, handler)
            return
        entry = self._serial.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                await self._process(raw, handler)
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._serial[key]

    async def _process(self, raw: Any, handler: Handler) -> None:
        raws = [ev.value for ev in raw] if isinstance(raw, list) else [raw]
        started = time.perf_counter()
        delay = 0.2
        attempts = 0
        while True:
            attempts += 1
            try:
                if self._unsynced:
                    await self.resync()
                out = await handler(raw)
                pending = self.perform(out)
                # Kafka's acks on everything this record produced come before the
                # input offset may be committed; a failure here redoes the record.
                # Every output settles first, so that a failed table write is known
                # to `resync` before the retry.
                await all_settled(pending)
                outcome = "ok"
            except PoisonPill as pill:
                log.warning("%s: poison pill (%s)", self.name, pill)
                parked = self.outputs()
                for r in raws:
                    parked.park(pill.reason, "poison", r, detail=pill.detail)
                pending = self.perform(parked)
                outcome = "poison"
            except TRANSIENT as exc:
                log.warning("%s: transient failure, retrying in %.1fs: %r", self.name, delay, exc)
                self._handled["retried"].inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            except Exception as exc:  # a bug or an unforeseen input: park, never stall
                if attempts < 6:  # about 6 s of backoff before a record is parked
                    log.exception("%s: failed, trying again", self.name)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                log.exception("%s: failed %d times, parking the record", self.name, attempts)
                parked = self.outputs()
                for r in raws:
                    parked.park("stage_failure", "poison", r, detail=repr(exc))
                pending = self.perform(parked)
                outcome = "failed"
            if outcome != "ok":
                try:
                    await asyncio.gather(*pending)
                except TRANSIENT:
                    await asyncio.sleep(delay)
                    continue
            self._handled[outcome].inc()
            self._seconds.observe(time.perf_counter() - started)
            return


def _acked(on_ack: OnAck, fut: asyncio.Future[tuple[int, int]]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        on_ack(*fut.result())


def register_metrics_page(app: faust.App) -> None:
    """Serve Prometheus metrics on the worker's own web port."""

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        body, ctype = metrics.render()
        return web.bytes(body, content_type=ctype.split(";")[0])
