"""What every stage shares: its output topics, events, parking, and the per-record loop.

`StageIO.process` runs one record through a handler and waits until every record
the handler produced is acknowledged by Kafka (acks=all) before the input event
is acked, so a crash at any point means the input is read again, never that an
output is missing (at-least-once; the stages downstream are idempotent per id).

`StageIO.run_batches` feeds a stage its input in batches (`streams.feed.batches`,
straight from Faust's consumer, in place of Faust's ``take_events``):
the records of a batch run concurrently, so their outputs leave in a few produce
requests instead of one each, and the batch's offsets are acked only after every
record of it is done. A batch's records start in offset order and a handler's
work up to its first wait runs uninterrupted, which keeps per-key order for the
stages that read and write a table.

A record that does not parse is a poison pill: it goes to ``errors`` with a
reason and the stage carries on. A transient failure (object store, scanner,
network) is retried with backoff for as long as it lasts, so lag grows instead of
mail being dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar, copy_context
from functools import partial
from typing import Any

import faust
import orjson
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
from faust.exceptions import PartitionsMismatch
from faust.serializers import codecs
from faust.streams import _current_event, current_event
from faust.types import TP, EventT

from mailflow import metrics
from mailflow.config import Settings
from mailflow.kafka_io import AsyncProducer, BrokerUnavailable
from mailflow.objstore import get_body
from schemas.records import ErrorRecord, Event, Message, PoisonPill
from streams import feed
from streams.app import topic
from streams.faust_compat import run_eagerly
from streams.topics import full_name

log = logging.getLogger("mailflow.stage")

Pending = list[Awaitable[Any]]

# Up to BATCH_MAX records per batch, and a batch waits at most BATCH_WITHIN for
# more: under load batches fill at once; when idle a record waits at most 20 ms.
BATCH_MAX = 256
BATCH_WITHIN = 0.02

# Tables: string keys, JSON values. (Faust encodes these keys as JSON strings; which
# partition a write goes to is the input record's, see `StageIO.table_write`.)
JSON_TABLE = faust.Schema(key_type=str, key_serializer="raw", value_serializer="json")


# Failures that are the world's, not the record's: wait and try again.
# PartitionsMismatch: on a fresh broker a table's new changelog topic can be missing
# from the client's metadata for a moment; it resolves with the next refresh.
# KafkaConnectionError, KafkaTimeoutError: an `AckedTable` changelog send (Faust's
# aiokafka producer) that the broker did not take.
TRANSIENT = (OSError, TimeoutError, asyncio.TimeoutError, ConnectionError, BrokerUnavailable,
             PartitionsMismatch, KafkaConnectionError, KafkaTimeoutError)

# The changelog sends of `AckedTable` writes made while one record is handled.
CHANGELOG_ACKS: ContextVar[list[Awaitable[Any]] | None] = ContextVar("changelog_acks", default=None)


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


class AckedTable(faust.Table):
    """A Faust table whose changelog sends a stage can await before its commit.

    For writes that go through Faust's own table machinery, such as a windowed
    table's ``+=`` (window keys, their encoding and expiry are Faust's), where
    `StageIO.table_write` does not fit. Faust sends the changelog record and
    forgets it (see `StageIO.table_write` for why that is not durable before the
    commit); here each send's future also joins the list in `CHANGELOG_ACKS`, which
    the stage sets around its writes (`acked_writes`) and awaits with the record's
    other outputs.
    """

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        fut = super().send_changelog(*args, **kwargs)
        acks = CHANGELOG_ACKS.get()
        if acks is not None:
            acks.append(fut)
        return fut


def acked_table(app: faust.App, name: str, **kwargs: Any) -> AckedTable:
    """``app.Table(name, **kwargs)``, as an `AckedTable`."""
    table = AckedTable(app, name=name, beacon=app.tables.beacon, **kwargs)
    app.tables.add(table)
    return table


@contextmanager
def acked_writes() -> Iterator[Pending]:
    """``with acked_writes() as acks:`` collects the changelog sends of the
    `AckedTable` writes made inside it."""
    acks: Pending = []
    token = CHANGELOG_ACKS.set(acks)
    try:
        yield acks
    finally:
        CHANGELOG_ACKS.reset(token)


class StageIO:
    def __init__(self, app: faust.App, settings: Settings, stage: str, linger_ms: int = 5) -> None:
        self.app = app
        self.settings = settings
        self.stage = stage
        self.linger_ms = linger_ms
        self._topics: dict[str, faust.TopicT] = {}
        self._producer: AsyncProducer | None = None
        # Table writes whose changelog record failed: (id(table), key) -> (table, key,
        # partition, the event that wrote it); sent again by `resync` before any
        # record's next attempt.
        self._unsynced: dict[tuple[int, str], tuple[Any, str, int, EventT | None]] = {}
        # Label lookups cost a lock and a dict walk per call: once per stage instead.
        self._handled = {o: metrics.STAGE_MESSAGES.labels(stage, o)
                         for o in ("ok", "poison", "failed", "retried")}
        self._seconds = metrics.STAGE_SECONDS.labels(stage)
        # librdkafka's idempotent producer holds its first record until it has its
        # producer id, about 0.5 s after it is made (measured: 503 ms, against 6 ms
        # without idempotence). Made on the stage's first record, that was a 0.5 s
        # hop at each stage for the first message after a start (bench/idle.py); so
        # it is made as the worker starts.
        app.task(self._start_producer)

    async def _start_producer(self) -> None:
        self.producer  # noqa: B018 (made now, not on the first record)

    def topic(self, short: str) -> faust.TopicT:
        if short not in self._topics:
            self._topics[short] = topic(self.app, self.settings, short)
        return self._topics[short]

    @property
    def producer(self) -> AsyncProducer:
        # Outputs go through librdkafka (C), not Faust's aiokafka producer: same
        # acks=all guarantee at a fraction of the CPU per record. Faust keeps the
        # consumer, the tables and their changelogs.
        if self._producer is None:
            self._producer = AsyncProducer(self.settings.kafka_bootstrap, timeout_ms=30000,
                                           **{"linger.ms": self.linger_ms})
        return self._producer

    def table_write(self, table: Any, key: str, value: Any, event: EventT | None = None
                    ) -> Awaitable[Any]:
        """``table[key] = value``, returning the changelog record's ack to await with
        the record's other outputs.

        A plain ``table[key] = value`` queues the changelog record in Faust's producer
        buffer and forgets it, and Faust's pre-commit flush of that buffer is best
        effort (it gives up after 0.1 s without progress), so an input offset can be
        committed while its table writes are still in memory; a kill -9 then loses
        them for good (a CI run lost 131 of 300 mailbox appends that way). Awaited,
        the commit waits.

        The changelog record goes out through the stage's librdkafka producer, with
        the key encoded by the table's own codec and a JSON value, not through
        Faust's pure-Python one: that was a third of the status stage's
        CPU. As Faust's own write does, the local store then records the offset it
        holds data up to, so a clean restart replays only the changelog's tail.

        The write belongs to the input record's partition (Faust's rule: a replica
        that owns an input partition owns that table partition, changelog and local
        store): `event`'s, or by default the current event's.
        """
        if event is None:
            event = current_event()
        with _acting_for(event):
            partition = table.partition_for_key(key)
            table.data[key] = value  # the local store
        return self._send_changelog(table, key, value, partition, event)

    def _send_changelog(self, table: Any, key: str, value: Any, partition: int,
                        event: EventT | None) -> asyncio.Future[tuple[int, int]]:
        name = table.changelog_topic.get_topic_name()
        # The key exactly as Faust encodes it (its codec, JSON for these tables): a
        # changelog is compacted and restored by key bytes. The value is any JSON.
        fut = self.producer.produce(name, codecs.dumps(table.key_serializer, key),
                                    orjson.dumps(value), partition=partition)
        store = table.data

        def settled(f: asyncio.Future[tuple[int, int]]) -> None:
            if f.cancelled() or f.exception() is not None:
                # The local store has the value and the changelog may not. The
                # record's retry will not write it again (its handler reads the local
                # store and finds the work done), so `resync` sends it first.
                self._unsynced[(id(table), key)] = (table, key, partition, event)
            else:
                store.set_persisted_offset(TP(name, partition), f.result()[1])

        fut.add_done_callback(settled)
        return fut

    async def resync(self) -> None:
        """Send again, with the key's current local value, every table write whose
        changelog record the broker did not take, and wait for the acks.

        Without this a write lost while the broker was away stayed in this replica's
        local store only: the record's retry found its work done and wrote nothing,
        its offset was committed, and a replica restoring that partition from the
        changelog later did not have it (a delivery ledger entry, hence a second
        send of a replayed record; a mailbox append). The current value includes
        the lost write, and is never older than one already sent: every write to a
        key of a partition this replica owns is made here, in order. Raises the
        first failure, after all have settled (each failure is kept again)."""
        while self._unsynced:
            entries = list(self._unsynced.values())
            self._unsynced.clear()
            sends = []
            for table, key, partition, event in entries:
                with _acting_for(event):  # the local store reads the event's partition
                    value = table.data.get(key)
                if value is None:  # the partition's store is no longer here: not ours
                    continue
                sends.append(self._send_changelog(table, key, value, partition, event))
            await all_settled(sends)

    async def send(self, short: str, key: str | bytes | None, value: bytes) -> Awaitable[Any]:
        k = key.encode() if isinstance(key, str) else key
        return self.producer.produce(full_name(self.settings, short), k, value)

    async def event(
        self, msg_id: str, state: str, recipients: Iterable[str] | None = None,
        detail: dict[str, Any] | None = None, sender: str | None = None, ts: float | None = None,
    ) -> Awaitable[Any]:
        ev = Event(
            id=msg_id, state=state, stage=self.stage, ts=ts or time.time(),
            recipients=list(recipients) if recipients is not None else None,
            detail=detail or {}, sender=sender,
        )
        return await self.send("events", msg_id, ev.to_json())

    async def park(
        self, reason: str, state: str, raw: bytes | None, msg_id: str | None = None,
        detail: str = "",
    ) -> Awaitable[Any]:
        rec = ErrorRecord(
            stage=self.stage, reason=reason, state=state, detail=detail, id=msg_id,
            record=raw.decode("utf-8", "replace") if raw is not None else None,
        )
        return await self.send("errors", msg_id, rec.to_json())

    async def body(self, msg: Message) -> bytes:
        if msg.body is not None:
            return msg.body
        assert msg.body_ref is not None
        return await get_body(self.settings.object_store_url, msg.body_ref)

    async def run_batches(
        self, stream: faust.StreamT, handler: Callable[..., Awaitable[Pending]],
        max_: int = BATCH_MAX, within: float = BATCH_WITHIN, with_event: bool = False,
    ) -> None:
        """Handle the stream a batch at a time; see the module docstring.

        `handler(raw)`, or `handler(raw, event)` with `with_event` (for the Kafka
        timestamp or a windowed table, which outside Faust's own per-event loop
        must be told the event)."""
        async for events in feed.batches(stream, max_, within):
            await self.process_batch(events, handler, with_event)

    async def process_batch(self, events: list[EventT], handler: Callable[..., Awaitable[Pending]],
                            with_event: bool = False) -> None:
        """Run one batch: each record's handler, then one wait for every output of
        the batch; a record that failed anywhere is redone through `process` (its
        retries, parking and poison pills), concurrently with the other failures.
        Returns once every record is done, so the batch's offsets may be acked.

        Each handler starts at once, in offset order, in its own context (as a task
        of its own would), with Faust's current event set to its record; one that
        waits goes on as a task. Most records need none: handing a record on does
        not wait, so a batch costs one wait on its acks instead of a task, a gather
        and a wake-up per record."""
        if self._unsynced:  # table writes to send again first: `process` does, per record
            await asyncio.gather(*(self._process_event(ev, handler, with_event) for ev in events))
            return
        started = time.perf_counter()
        runs = []
        for ev in events:
            ctx = copy_context()
            ctx.run(_current_event.set, weakref.ref(ev))
            call = handler(ev.value, event=ev) if with_event else handler(ev.value)
            try:
                runs.append(run_eagerly(call, ctx))
            except Exception as exc:  # noqa: BLE001 (redone below, where it is judged)
                runs.append((True, exc))
        outputs: list[Pending | BaseException] = []
        for done, result in runs:
            if not done:
                try:
                    result = await result
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    result = exc
            outputs.append(result)
        failed = []
        for ev, out in zip(events, outputs, strict=True):
            failure = out if isinstance(out, BaseException) else await _first_failure(out)
            if failure is not None:
                failed.append(ev)
        if failed:
            # A failed table write is known to `resync` by now: every output settled.
            await asyncio.gather(*(self._process_event(ev, handler, with_event) for ev in failed))
        done_n = len(events) - len(failed)
        if done_n:
            self._handled["ok"].inc(done_n)
            elapsed = time.perf_counter() - started
            for _ in range(done_n):
                self._seconds.observe(elapsed)

    async def _process_event(self, ev: EventT, handler: Callable[..., Awaitable[Pending]],
                             with_event: bool) -> None:
        # As its own task, Faust's current event is this record's, as in Faust's own
        # per-event loop, so table writes land in the record's partition.
        _current_event.set(weakref.ref(ev))
        await self.process(ev.value, partial(handler, event=ev) if with_event else handler)

    async def process(
        self, raw: Any, handler: Callable[[Any], Awaitable[Pending]]
    ) -> None:
        """Run `handler` on one record's value, or on a list of Faust events (parked
        together on a failure), until it succeeds, is parked, or is poison."""
        raws = [ev.value for ev in raw] if isinstance(raw, list) else [raw]
        started = time.perf_counter()
        delay = 0.2
        attempts = 0
        while True:
            attempts += 1
            try:
                if self._unsynced:
                    await self.resync()
                pending = await handler(raw)
                # Kafka's acks on everything this record produced come before the
                # input offset may be committed; a failure here redoes the record.
                # Every output settles first, so that a failed table write is known
                # to `resync` before the retry.
                await all_settled(pending)
                outcome = "ok"
            except PoisonPill as pill:
                log.warning("%s: poison pill (%s)", self.stage, pill)
                pending = [await self.park(pill.reason, "poison", r, detail=pill.detail) for r in raws]
                outcome = "poison"
            except TRANSIENT as exc:
                log.warning("%s: transient failure, retrying in %.1fs: %r", self.stage, delay, exc)
                self._handled["retried"].inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            except Exception as exc:  # a bug or an unforeseen input: park, never stall
                if attempts < 6:  # about 6 s of backoff before a record is parked
                    log.exception("%s: failed, trying again", self.stage)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                log.exception("%s: failed %d times, parking the record", self.stage, attempts)
                pending = [await self.park("stage_failure", "poison", r, detail=repr(exc)) for r in raws]
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


class DurableWrites(MutableMapping[str, Any]):
    """A view of a table for one record: reads pass through, each write goes through
    `StageIO.table_write` and its ack is kept in `acks` for the record's pending outputs."""

    def __init__(self, io: StageIO, table: Any) -> None:
        self.io = io
        self.table = table
        self.acks: Pending = []

    def __getitem__(self, key: str) -> Any:
        return self.table[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.table.get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        self.acks.append(self.io.table_write(self.table, key, value))

    def __delitem__(self, key: str) -> None:
        raise TypeError("stages never delete table keys")

    def __iter__(self) -> Iterator[str]:
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)


def register_metrics_page(app: faust.App) -> None:
    """Serve Prometheus metrics on the worker's own web port."""

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        body, ctype = metrics.render()
        return web.bytes(body, content_type=ctype.split(";")[0])
