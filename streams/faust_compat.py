"""Every change mailflow makes to Faust's internals, in one place, and the check
that the installed Faust is the one they were written for.

faust-streaming is pinned to `TESTED_VERSION` (pyproject.toml). Each entry of
`PATCHES` names the Faust attribute it replaces, why, and the upstream issue; the
attributes of Faust that the protections below only read are in `READS`.
`install()` runs `check()` first and refuses to patch anything (raising
`FaustCompatError`, with every mismatch listed) unless the version is the tested
one and every patched or read attribute is there with the shape the patches
assume: the same parameters, and the lines of Faust's own code they depend on.
On another Faust a stage then fails at start with a message saying what moved,
instead of running with a guarantee silently gone.

Only stage worker processes install the patches: `streams.app.make_app` calls
`install()` before it builds a stage's app. Importing this module, `streams.app`
or anything the API imports changes nothing in Faust.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import time
from collections.abc import Callable, Coroutine, Generator, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import aiokafka
import aiokafka.consumer.subscription_state
import faust
from aiokafka import errors as KafkaErrors
from aiokafka.consumer.fetcher import Fetcher
from faust.sensors.monitor import Monitor
from faust.transport.conductor import Conductor, ConductorCompiler
from faust.transport.consumer import CONSUMER_FETCHING, Consumer, ensure_TP
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.producer import ProducerBuffer
from faust.types import EventT, Message, StreamT
from faust.types.tuples import TP

from streams.feed import ENDED, FEEDS, Feed

TESTED_VERSION = "0.15.3"
TESTED_AIOKAFKA = "0.14.0"  # Faust's Kafka client, patched below too

log = logging.getLogger("mailflow.stage")


class FaustCompatError(RuntimeError):
    """The installed Faust is not the one mailflow's patches were written for."""


# --- ProducerBuffer.max_messages --------------------------------------------------------

# Table writes queue their changelog records in Faust's ProducerBuffer; past 100
# pending records Faust pauses every stream until the buffer drains one record at
# a time (with 0.1 s waits), which caps a stage far below what Kafka takes. A
# larger bound keeps the back-pressure and removes the stall.
PRODUCER_BUFFER_MAX = 10_000


# --- Consumer._read_offset ----------------------------------------------------------------

class NoReadOffsets(MutableMapping[Any, Any]):
    """Stands in for Faust's per-partition "read offset", which it uses to drop any
    fetched record below the highest offset it has seen, and to call a jump a "gap"
    whose offsets count as acknowledged.

    After a rebalance Faust resumes fetching a stream partition before it seeks it
    back to the committed offset (faust-streaming #221, #606). Records fetched early
    raise the read offset; the queue they sat in is cleared; the re-fetch after the
    seek is then dropped as old: the stage skips those records and its commit stops
    for good, or their offsets count as a gap and are committed past (mail lost).
    Without read offsets nothing is dropped and nothing is assumed: a record fetched twice is
    handled twice, which every stage is idempotent for, and Faust's ack still
    ignores offsets below the committed one.
    """

    def __getitem__(self, tp: Any) -> None:
        return None

    def __setitem__(self, tp: Any, offset: Any) -> None:
        pass

    def __delitem__(self, tp: Any) -> None:
        pass

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __len__(self) -> int:
        return 0


_consumer_init = Consumer.__init__


def _init_without_read_offsets(self: Any, *args: Any, **kwargs: Any) -> None:
    _consumer_init(self, *args, **kwargs)
    self._read_offset = NoReadOffsets()


# --- Consumer._new_offset, Consumer.perform_seek: the commit base -----------------------

# Faust commits the first run of consecutive acknowledged offsets with a check that
# is one short: with C committed (the next offset to read) it commits past C while
# the record at C is still being handled, as soon as C+1 is done; and with no
# committed offset (a fresh group, or one committed at 0, which Faust reads as none)
# it does not check at all. A stage with records in flight out of order (deliver's
# 32 actors) that is killed then never handles the record it committed past: mail
# lost. A commit here starts exactly at the partition's committed offset.
_faust_new_offset = Consumer._new_offset


def commit_base(consumer: Any, tp: Any) -> int | None:
    """The offset a commit of `tp` must start from: the committed one, 0 included."""
    base = consumer._committed_offset[tp]
    return base if base is not None else getattr(consumer, "_seek_base", {}).get(tp)


def _new_offset_from_base(self: Any, tp: Any) -> int | None:
    acked = self._acked[tp]
    base = commit_base(self, tp)
    if acked and base is not None and min(acked) > base:
        return None  # the record at `base` is not done (or was dropped: see `refetch_holes`)
    return _faust_new_offset(self, tp)


async def _perform_seek_keeping_base(self: Any) -> None:
    # Faust keeps the committed offsets but turns 0 into None; keep them exactly.
    offsets = await self.seek_to_committed()
    self._seek_base = {ensure_TP(tp): off for tp, off in offsets.items() if off is not None and off >= 0}
    self._committed_offset.update({tp: off or None for tp, off in self._seek_base.items()})


# --- AIOKafkaConsumerThread.commit: a commit that never returns ---------------------------

# An offset commit sent as the broker dies may never return, and stops that stage
# for good while the others go on, with nothing but a Faust log line after five
# minutes ("Has not committed TP"). A replica whose commit has not
# returned after COMMIT_STUCK seconds exits, as if killed; its supervisor (`mailflow
# up`, an orchestrator, bench/chaos) starts it again and it resumes from its last
# commit like after any crash, handling a few records twice (every stage is
# idempotent). COMMIT_STUCK is well above a broker restart (about 15 s), which
# commits wait out; a broker away for longer makes replicas restart until it is back.
COMMIT_STUCK = 120.0
_thread_commit = AIOKafkaConsumerThread.commit


async def _commit_or_exit(self: Any, offsets: Any) -> Any:
    try:
        return await asyncio.wait_for(_thread_commit(self, offsets), COMMIT_STUCK)
    except TimeoutError:
        log.critical("offset commit has not returned in %.0f s; exiting so that this replica "
                     "is started again", COMMIT_STUCK)  # a stream handler flushes each record
        os._exit(75)  # EX_TEMPFAIL; no clean shutdown: it would wait on the same commit


# --- refetch_holes: records Faust fetched and dropped (reads Faust's consumer state) ------

# Records Faust fetched and then dropped without handling: its fetch loop discards
# the rest of a fetched batch when flow control pauses or the generation changes, and
# records fetched while a partition is not yet active, trusting a later seek to read
# them again. Right after a table's recovery some are not read again, and the commit
# stays below them for good: nothing is lost, since the commit cannot pass them, but
# the stage's lag never falls and every restart handles the backlog again. A partition whose
# acknowledged offsets start past its commit base, with no record below them fetched
# and unacknowledged, for HOLE_GRACE seconds, is sought back to the base and read again
# (every stage is idempotent for a record handled twice). Related upstream:
# faust-streaming #88 (records dropped when a buffer fills).
HOLE_GRACE = 5.0


def in_flight_offsets(consumer: Any) -> dict[Any, list[int]]:
    """Per partition, the offsets of the records a stage has taken and not yet acked
    (Faust's ``Consumer._unacked_messages``)."""
    in_flight: dict[Any, list[int]] = {}
    for m in list(consumer._unacked_messages):
        if not m.acked:
            in_flight.setdefault(m.tp, []).append(m.offset)
    return in_flight


def hole_start(base: int | None, acked: list[int], in_flight: list[int]) -> int | None:
    """Where a partition must be read again from, or None: its lowest acked offset is
    past `base` and no record in between is in flight (fetched, not yet acked)."""
    if base is None or not acked:
        return None
    first_acked = min(acked)
    if first_acked <= base or any(base <= off < first_acked for off in in_flight):
        return None
    return base


def fetch_position(consumer: Any, tp: Any) -> int | None:
    """The offset `tp` is fetched from next (aiokafka's consumed position: every
    record below it was handed to Faust), or None where not known. Read across
    threads from the consumer thread's state: a plain attribute read."""
    try:
        sub = consumer._thread._consumer._subscription.subscription
        state = sub.assignment.state_value(tp) if sub is not None and sub.assignment else None
    except AttributeError:
        return None
    if state is None or not state.has_valid_position:
        return None
    return int(state.position)


def dropped_start(base: int | None, position: int | None, acked: list[int],
                  in_flight: list[int], buffered: bool) -> int | None:
    """Where a partition must be read again from, or None: records from `base` up to
    its fetch `position` were handed to Faust, and none of them is buffered for the
    stage, in flight or acknowledged. `hole_start`'s other half: with no record acked
    past the hole there is nothing for it to see, and a partition whose dropped
    records were its last ones would never be read again."""
    if base is None or position is None or position <= base or buffered or in_flight:
        return None
    if any(off >= base for off in acked):
        return None
    return base


def _feed_partitions(app: Any) -> dict[Any, Feed]:
    """The partitions whose only subscriber is a feed (`_build_handler_feeding`)."""
    callbacks = getattr(getattr(app, "topics", None), "_tp_to_callback", None) or {}
    return {tp: cb for tp, cb in list(callbacks.items()) if isinstance(cb, Feed)}


def _stream_partitions(app: Any) -> dict[Any, list[Any]]:
    """The partitions read by a Faust stream (an agent of mode ``each``, a retry
    tier), each with the channels the conductor puts its records in (their queues
    hold what was fetched and not yet taken by the stream)."""
    index = getattr(getattr(app, "topics", None), "_tp_index", None) or {}
    return {tp: list(channels) for tp, channels in list(index.items()) if channels}


def _waiting_partitions(feeds: dict[Any, Feed], streams: dict[Any, list[Any]]) -> set[Any]:
    """Partitions with a fetched record waiting for a stage: in a feed's buffer or in
    a stream channel's queue (read without making one: `Channel.queue` would)."""
    waiting = {m.tp for fd in set(feeds.values()) for m in fd.buffer} if feeds else set()
    queues = {id(q): q for chans in streams.values() for c in chans
              if (q := getattr(c, "_queue", None)) is not None}
    for q in queues.values():
        for ev in list(getattr(q, "_queue", ())):
            msg = getattr(ev, "message", None)
            if msg is not None:
                waiting.add(msg.tp)
    return waiting


async def refetch_holes(app: faust.App, seen: dict[Any, Any], now: float) -> list[tuple[Any, int]]:
    """One check of every partition for records fetched and dropped (see HOLE_GRACE);
    seeks those whose hole lasted the grace period. Returns the (tp, offset) sought.

    Two shapes of hole: acked offsets that start past the commit base
    (`hole_start`), and a fetch position past the base with nothing of it buffered
    (a feed's buffer, a stream channel's queue), in flight or acked
    (`dropped_start`), on any input partition: a cluster chaos run left the deliver
    stage (a stream, not a feed) fetched 51 records past its commit after a
    recovery, none of them handled, and the drain timed out. After a seek of the
    second kind the same (base, position) is not sought again: offsets that hold no
    record for a stage (a transaction's markers) read as such a hole for good."""
    consumer: Any = app.consumer  # Faust's Consumer: its private ack bookkeeping
    if app.rebalancing or not consumer.flow_active:
        seen.clear()
        return []
    in_flight = in_flight_offsets(consumer)
    sought = []
    for tp, acked in list(consumer._acked.items()):
        start = hole_start(commit_base(consumer, tp), list(acked), in_flight.get(tp, []))
        if start is None:
            seen.pop(tp, None)
        elif now - seen.setdefault(tp, now) >= HOLE_GRACE:
            log.warning("%s: records %d to %d were fetched but never handled; reading from %d "
                        "again", tp, start, min(acked) - 1, start)
            await consumer.seek(tp, start)
            seen.pop(tp, None)
            sought.append((tp, start))
    feeds = _feed_partitions(app)
    streams = {tp: chans for tp, chans in _stream_partitions(app).items() if tp not in feeds}
    if getattr(consumer, "_handing_out", False):
        # The fetch loop holds records it has not queued yet (waiting for room in a
        # full stream queue, say): a position past the base proves nothing now.
        for tp in [*feeds, *streams]:
            seen.pop(("dropped", tp), None)
        return sought
    buffered = _waiting_partitions(feeds, streams)
    for tp in [*feeds, *streams]:
        base, position = commit_base(consumer, tp), fetch_position(consumer, tp)
        start = dropped_start(base, position, list(consumer._acked.get(tp) or ()),
                              in_flight.get(tp, []), tp in buffered)
        key = ("dropped", tp)
        if start is None or seen.get(("sought", tp)) == (base, position):
            seen.pop(key, None)
        elif now - seen.setdefault(key, now) >= HOLE_GRACE:
            log.warning("%s: records %d to %d were fetched but never handled; reading from %d "
                        "again", tp, start, (position or 0) - 1, start)
            await consumer.seek(tp, start)
            seen.pop(key, None)
            seen[("sought", tp)] = (base, position)
            sought.append((tp, start))
    return sought


# --- Consumer._drain_messages: the fetch loop without four tasks per record -------------

class _Rest:
    """The rest of a coroutine that `run_eagerly` started: awaiting it hands the
    future the coroutine was waiting on to the task that awaits this, then goes on
    driving the coroutine (the same trampoline a Task is)."""

    __slots__ = ("coro", "waiting_on")

    def __init__(self, coro: Coroutine[Any, Any, Any], waiting_on: Any) -> None:
        self.coro = coro
        self.waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self.coro, self.waiting_on
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation included: the coroutine sees it
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _finish(rest: _Rest) -> Any:
    return await rest


def run_eagerly(coro: Coroutine[Any, Any, Any], context: contextvars.Context | None = None,
                ) -> tuple[bool, Any]:
    """Run `coro` now, in `context` (default: the caller's), up to its first wait.

    Returns ``(True, result)`` when it finished without waiting, else ``(False,
    task)``: a task (in the same context) that runs the rest. An exception raised
    before the first wait is raised here. Python 3.12's eager tasks, for 3.11: most
    records need no task at all, since handing them on never waits."""
    try:
        waiting_on = context.run(coro.send, None) if context is not None else coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    task = asyncio.get_running_loop().create_task(_finish(_Rest(coro, waiting_on)),
                                                  context=context)
    return False, task


# Faust's fetch loop hands each record to the conductor through
# ``wait_first(callback(message), suspend_flow.wait())``: four tasks, an
# ``asyncio.wait`` and their cancellations per record, so that a rebalance can stop a
# hand-over that waits (on flow control, the producer buffer or a full stream
# queue). Nearly every hand-over never waits. Here the callback runs at once while
# flow is not suspended; only one that does wait goes on as a task under the same
# ``wait_first``, and while flow is suspended Faust's own path is taken. The read
# offsets Faust's loop consults are gone (see NoReadOffsets: every record is
# delivered and none counted as a gap), so this loop delivers every record. The
# saving: bench/hop.py, docs/BENCHMARKS.md. Upstream: faust-streaming #229 (a
# deadlock in this very wait_first), robinhood/faust #563 (slow consumption).
#
# A partition whose conductor callback is a `streams.feed.Feed` (see
# `_build_handler_feeding`) gets its records by a plain call, `Feed.offer`, without
# the conductor's lock and closures, and each feed that got records is told when a
# fetch's records are all handed over (`Feed.fetched`: its batch is ready). While
# the conductor rebuilds its callbacks (its lock held) or flow is suspended, every
# record takes the conductor's path.
async def _drain_messages_eagerly(self: Any, fetcher: Any) -> None:  # pragma: no cover
    callback = self.callback
    conductor = self.transport.app.topics
    tp_callbacks = conductor._tp_to_callback
    get_tp_callback = tp_callbacks.get
    rebuilding = conductor._tp_to_callback_lock.locked
    getmany = self.getmany
    consumer_should_stop = self._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set
    set_flag = self.diag.set_flag
    unset_flag = self.diag.unset_flag
    commit_every = self._commit_every
    suspend_flow = self.suspend_flow
    suspended = suspend_flow.is_set
    yield_every = 100
    num_since_yield = 0
    sleep = asyncio.sleep
    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(CONSUMER_FETCHING)
            ait = getmany(timeout=1.0)
            # As Faust: getmany can return at once, in a loop never yielding.
            await self.sleep(0)
            if not self.should_stop:
                fed: set[Feed] = set()
                async for tp, message in ait:
                    # Records of this fetch are being handed out: a partition's position
                    # is past records not yet queued for its stage (`refetch_holes` waits).
                    self._handing_out = True
                    num_since_yield += 1
                    if num_since_yield > yield_every:
                        await sleep(0)
                        num_since_yield = 0
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        await self.commit()
                    if suspended():
                        await self.wait_first(callback(message), suspend_flow.wait())
                        continue
                    feed = get_tp_callback(tp)
                    if type(feed) is Feed and not rebuilding() and feed.offer(message):
                        fed.add(feed)
                        continue
                    done, rest = run_eagerly(callback(message))
                    if not done:
                        await self.wait_first(rest, suspend_flow.wait())
                self._handing_out = False
                for feed in fed:
                    feed.fetched()
                unset_flag(CONSUMER_FETCHING)
    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            self.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            self.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        self.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        self._handing_out = False
        unset_flag(CONSUMER_FETCHING)


# --- Conductor._build_handler: partitions fed to a stage's batches -----------------

# Faust's conductor compiles, per assigned partition, a callback that decodes each
# record into an event and puts it in the queue of every channel subscribed to the
# partition, for a stream to iterate; for a stage that handles its input a batch at
# a time that machinery (the conductor's closure, the event, the queue, the stream
# iterator and per-event acks) is about a third of a no-op hop's CPU. A partition
# whose only subscriber is the channel of a `streams.feed.Feed` gets the feed itself
# as its callback; one it shares with other channels gets a callback that offers
# the record to each feed, then runs Faust's callback for the other channels; a
# channel whose feed ended receives nothing. Upstream: robinhood/faust #563 (slow
# consumption), faust-streaming #229.
_faust_build_handler = Conductor._build_handler


def _build_handler_feeding(self: Any, tp: Any, channels: Any) -> Any:
    feeds = [FEEDS[c] for c in channels if c in FEEDS]
    others = {c for c in channels if c not in FEEDS and c not in ENDED}
    if not feeds:
        return _faust_build_handler(self, tp, others if len(others) != len(channels) else channels)
    if len(feeds) == 1 and not others:
        return feeds[0]
    rest = _faust_build_handler(self, tp, others) if others else None

    async def on_message(message: Any) -> None:
        for feed in feeds:
            await feed(message)
        if rest is not None:
            await rest(message)

    return on_message


# --- AIOKafkaConsumerThread._create_worker_consumer: the fetch long poll --------------

# Faust hard-codes the fetch's long poll at fetch_max_wait_ms=1500. aiokafka sends one
# fetch at a time to a broker, and holds back a node's next fetch while any of its
# partitions still has fetched records the stream has not taken; the broker answers a
# fetch as soon as any of its partitions has data. Session 7 set this to 50 ms on the
# theory that a record's partition could be missing from the fetch in flight, so it
# waited for that fetch to run out; bench/idle.py later found the slow hops were the
# idempotent producer's first record (see `streams.runtime.Stage`), and with the feed
# taking records at once the partition is in the next fetch. 50 ms cost an idle stack a
# third of a core (20 empty fetches a second per stage, and the broker answering
# them): 500 ms (aiokafka's own default) halves that, with the same idle latencies
# (docs/BENCHMARKS.md, session 10). The bound stays below Faust's 1.5 s for a fetch
# that did leave a partition out (one paused by flow control).
FETCH_MAX_WAIT_MS = 500


@dataclass(frozen=True)
class FetchPolicy:
    """What a stage's fetch asks the broker for: answer once `min_bytes` are there,
    or after `max_wait_ms` (Kafka's fetch.min.bytes and fetch.max.wait.ms)."""

    min_bytes: int = 1
    max_wait_ms: int = FETCH_MAX_WAIT_MS


# The mail's stages: a record is fetched as soon as it is there.
MAIL_PATH = FetchPolicy()
# Stages off the mail's path (they read the status events: status, webhooks). A
# fetch that answers with every record as it comes costs aiokafka's Python a request
# and a response for each of the consumer's partitions (the webhooks stage has 40,
# 36 of them its idle retry tiers): its consumer thread was the stage's largest
# cost, the broker answered it as often, and each small answer was a batch of its
# own. Answered once 64 KiB are there, a busy stage's fetches each carry many
# records; an idle one hears of an event at most 200 ms late (the mail is not held
# by it: these stages only tell of it). docs/BENCHMARKS.md, "Whole path, session 15".
BATCHED = FetchPolicy(min_bytes=64 * 1024, max_wait_ms=200)


def set_fetch_policy(app: faust.App, policy: FetchPolicy) -> None:
    """Use `policy` for `app`'s consumer (before the worker starts it)."""
    app._mailflow_fetch = policy  # type: ignore[attr-defined]


_faust_worker_consumer = AIOKafkaConsumerThread._create_worker_consumer


def _worker_consumer_short_poll(self: Any, transport: Any) -> aiokafka.AIOKafkaConsumer:
    consumer = _faust_worker_consumer(self, transport)
    policy: FetchPolicy = getattr(self.app, "_mailflow_fetch", MAIL_PATH)
    consumer._fetch_max_wait_ms = policy.max_wait_ms  # both read by start(), for its fetcher
    consumer._fetch_min_bytes = policy.min_bytes
    return consumer


# --- subclasses through Faust's public settings, written against its internals ---------


# --- aiokafka's Fetcher._proc_offset_request (Faust's Kafka client) ----------------------

# aiokafka 0.14's fetcher, looking up a partition's start position (ListOffsets, right
# after an assignment or a reset), gets "not the leader" from a node that lost the
# partition, waits `retry_backoff` and asks the same node again: unlike its other paths
# it never refreshes the metadata that named that node, so the consumer stays on the
# stale leader until the periodic refresh (`metadata_max_age_ms`, five minutes): when
# a killed broker comes back and takes its leaderships again, a replica can go on
# asking the old leader and read nothing. Here an answer that says the metadata is
# stale asks for fresh metadata, as the fetch path does.
_fetcher_offset_request = Fetcher._proc_offset_request


async def _offsets_refreshing_stale_metadata(self: Any, node_id: int, topic_data: Any) -> Any:
    try:
        return await _fetcher_offset_request(self, node_id, topic_data)
    except KafkaErrors.KafkaError as err:
        if getattr(err, "invalid_metadata", False):
            self._client.force_metadata_update()
        raise


class RawSchema(faust.Schema):
    """Keys and values as the bytes Kafka holds, decoded without Faust's serializer
    registry, whose decode of a raw topic goes through the registry and the codec for
    both (a tenth of a no-op hop's CPU) to return the same bytes. For topics of raw bytes
    only (`streams.app.topic`)."""

    def __init__(self) -> None:
        super().__init__(key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw")

    def compile(self, app: Any, *, on_key_decode_error: Any = None,
                on_value_decode_error: Any = None, default_propagate: bool = False) -> Any:
        create_event = app.create_event

        async def decode(message: Message, *, propagate: bool = default_propagate) -> EventT:
            return create_event(message.key, message.value, message.headers, message)

        return decode


class StageMonitor(Monitor):
    """Faust's monitor without its per-record statistics.

    Faust's `Monitor` counts every record and event by topic, stream and task, and
    times each in and out, for its own web views, which no stage serves or reads
    (a stage's figures are `mailflow.metrics`). It keeps what Faust itself reads: when
    each partition's stream last took an event (the consumer's slow-stream check,
    `verify_event_path`). Commit, rebalance and table statistics stay Faust's.
    Installed with the app's ``Monitor`` setting (`streams.app.make_app`)."""

    def on_message_in(self, tp: TP, offset: int, message: Message) -> None:
        pass

    def on_stream_event_in(self, tp: TP, offset: int, stream: StreamT, event: EventT) -> None:
        self.stream_inbound_time[tp] = time.monotonic()

    def on_stream_event_out(self, tp: TP, offset: int, stream: StreamT, event: EventT,
                            state: dict[str, Any] | None = None) -> None:
        pass

    def on_message_out(self, tp: TP, offset: int, message: Message) -> None:
        pass


# --- the list, the check, the installation ------------------------------------------------

@dataclass(frozen=True)
class Patch:
    """One Faust attribute mailflow replaces (or, with `replacement` None, only reads).

    `params`: the parameter names the attribute (a function) must have; `value_type`:
    the type it must be (a plain value); `source_has`: fragments of Faust's code that
    the patch depends on, each of which must appear in `source_of`'s source (the
    attribute's own by default)."""

    owner: type
    name: str
    replacement: Any
    reason: str
    upstream: str
    params: tuple[str, ...] | None = None
    value_type: type | None = None
    source_has: tuple[str, ...] = ()
    source_of: Callable[..., Any] | None = field(default=None, compare=False)

    @property
    def where(self) -> str:
        return f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}"


PATCHES: tuple[Patch, ...] = (
    Patch(ProducerBuffer, "max_messages", PRODUCER_BUFFER_MAX,
          "100 pending changelog records paused every stream (see PRODUCER_BUFFER_MAX)",
          "faust-streaming #173", value_type=int),
    Patch(Consumer, "__init__", _init_without_read_offsets,
          "read offsets dropped records re-fetched after a rebalance (see NoReadOffsets)",
          "faust-streaming #221, #606",
          params=("self", "transport", "callback", "on_partitions_revoked",
                  "on_partitions_assigned"),
          source_has=("self._read_offset = defaultdict(", "self._acked = defaultdict(list)",
                      "self._committed_offset = defaultdict(",
                      "self._unacked_messages = WeakSet()")),
    Patch(Consumer, "_new_offset", _new_offset_from_base,
          "commits passed a record still in flight at the committed offset",
          "faust-streaming #606 (fix proposed in #707), #312",
          params=("self", "tp"), source_has=("acked = self._acked[tp]",)),
    Patch(Consumer, "perform_seek", _perform_seek_keeping_base,
          "a committed offset of 0 became None, so no commit base was known",
          "aiokafka #1003 (the same 0-is-falsy slip in seek_to_committed)",
          params=("self",),
          source_has=("await self.seek_to_committed()", "offset if offset else None")),
    Patch(AIOKafkaConsumerThread, "commit", _commit_or_exit,
          "an offset commit sent as the broker died never returned and stopped the stage",
          "none found upstream (Faust only logs 'Has not committed TP' after 300 s)",
          params=("self", "offsets"), source_has=("call_thread(self._commit, offsets)",)),
    Patch(AIOKafkaConsumerThread, "_create_worker_consumer", _worker_consumer_short_poll,
          "a record could wait out a 1.5 s fetch that left its partition out (idle latency); "
          "a stage off the mail's path fetches in larger answers (FetchPolicy)",
          "none found upstream (Faust hard-codes fetch_max_wait_ms=1500)",
          params=("self", "transport"), source_has=("fetch_max_wait_ms=1500",)),
    Patch(aiokafka.AIOKafkaConsumer, "start", None,
          "the fetch wait and size set on a made consumer take effect only if start() reads them",
          "none", params=("self",),
          source_has=("fetch_max_wait_ms=self._fetch_max_wait_ms", "fetch_min_bytes=self._fetch_min_bytes")),
    # The replacement mirrors Faust's loop; these are the lines it was written from.
    Patch(Consumer, "_drain_messages", _drain_messages_eagerly,
          "four tasks per record to hand each to the conductor (see _drain_messages_eagerly)",
          "faust-streaming #229; robinhood/faust #563", params=("self", "fetcher"),
          source_has=("getmany(timeout=1.0)", "if self._n_acked >= commit_every:",
                      "callback(message), self.suspend_flow.wait()",
                      "get_read_offset = self._read_offset.__getitem__",
                      "except self.consumer_stopped_errors:")),
    Patch(Conductor, "_build_handler", _build_handler_feeding,
          "the conductor's per-record event, queue and stream were a third of a hop's CPU "
          "(see _build_handler_feeding, streams/feed.py)",
          "robinhood/faust #563; faust-streaming #229", params=("self", "tp", "channels"),
          source_has=("return self._compiler.build(self, tp, channels)",)),
    # What the feed's path reads or calls of Faust's, as the conductor's callback does.
    Patch(Conductor, "__init__", None,
          "the fetch loop reads the conductor's callback map; refetch_holes its channels per partition",
          "none", params=("self", "app"),
          source_has=("self._tp_to_callback = {}", "self._tp_to_callback_lock = asyncio.Lock()",
                      "self._tp_index = defaultdict(set)")),
    Patch(faust.Channel, "__init__", None,
          "refetch_holes reads a stream channel's queue without making one", "none",
          source_has=("self._queue = queue",)),
    Patch(Conductor, "_update_callback_map", None, "a feed rebuilds the callbacks as it starts",
          "none", params=("self",), source_has=("self._build_handler(tp",)),
    Patch(ConductorCompiler, "build", None,
          "Feed.__call__ waits where the conductor's callback does",
          "none", params=("self", "conductor", "tp", "channels"),
          source_has=("await acquire_flow_control()", "await wait_until_producer_ebb()",
                      "message.incref(channels_n)")),
    Patch(Consumer, "on_buffer_full", None, "a full feed takes its partition out of the fetch",
          "none", params=("self", "tp")),
    Patch(Consumer, "on_buffer_drop", None, "a drained feed puts it back", "none",
          params=("self", "tp")),
    Patch(Consumer, "ack", None, "a feed acks each handled record's message",
          "none", params=("self", "message"),
          source_has=("self._unacked_messages.discard(message)", "acked_for_tp.append(offset)")),
    Patch(Message, "ack", None, "a feed acks through the message's reference count", "none",
          params=("self", "consumer", "n"), source_has=("return self.on_final_ack(consumer)",)),
    Patch(Fetcher, "_proc_offset_request", _offsets_refreshing_stale_metadata,
          "an offset lookup answered by a stale leader retried it for five minutes",
          "none found upstream (aiokafka's fetch path refreshes; this one does not)",
          params=("self", "node_id", "topic_data"),
          source_has=("response = await self._client.send(node_id, request)",)),
    # Read, not replaced: refetch_holes reads the consumer's state and seeks.
    # Overridden by RawSchema and StageMonitor, which must stay what Faust calls.
    Patch(faust.Schema, "compile", None, "RawSchema replaces the decode it compiles",
          "none (a public extension point)",
          params=("self", "app", "on_key_decode_error", "on_value_decode_error",
                  "default_propagate"),
          source_has=("create_event(k, v, message.headers, message)",)),
    Patch(Monitor, "on_stream_event_in", None, "StageMonitor keeps only its inbound time",
          "none (a public extension point)", params=("self", "tp", "offset", "stream", "event"),
          source_has=("self.stream_inbound_time[tp] = monotonic()",)),
    Patch(AIOKafkaConsumerThread, "verify_event_path", None,
          "the only reader of the monitor's per-partition figures a stage needs",
          "none", params=("self", "now", "tp"),
          source_has=("monitor.stream_inbound_time.get(tp)",)),
    *(Patch(Monitor, name, None, "StageMonitor overrides it to do nothing",
            "none (a public extension point)", params=("self", "tp", "offset"))
      for name in ("on_message_in", "on_stream_event_out", "on_message_out")),
    Patch(Consumer, "seek", None, "refetch_holes seeks a partition back to its commit base",
          "faust-streaming #88", params=("self", "partition", "offset")),
    Patch(Consumer, "flow_active", None, "refetch_holes judges nothing while flow is paused",
          "faust-streaming #88"),
    Patch(aiokafka.consumer.subscription_state.Assignment, "state_value", None,
          "fetch_position reads the consumed position refetch_holes judges by", "none",
          params=("self", "tp"), source_has=("return self._tp_state.get(tp)",)),
    # What streams.runtime._AckedTable's window writes do as Faust's own would.
    Patch(faust.Table, "on_key_set", None,
          "_AckedTable.on_key_set sends the changelog record itself, then does the rest as this",
          "none", params=("self", "key", "value"),
          source_has=("self._maybe_set_key_ttl(key, partition)", "self._sensor_on_set(self, key, value)")),
    Patch(faust.Topic, "prepare_key", None, "a window write's changelog key, encoded as Faust's",
          "none", params=("self", "key", "key_serializer", "schema", "headers")),
    Patch(faust.Topic, "prepare_value", None, "a window write's changelog value, encoded as Faust's",
          "none", params=("self", "value", "value_serializer", "schema", "headers")),
)
READS = tuple(p for p in PATCHES if p.replacement is None)

_originals: dict[tuple[type, str], Any] = {}


def _problems_of(p: Patch) -> list[str]:
    if not hasattr(p.owner, p.name):
        return [f"{p.where} is missing"]
    current = _originals.get((p.owner, p.name), inspect.getattr_static(p.owner, p.name))
    if p.value_type is not None and not isinstance(current, p.value_type):
        return [f"{p.where} is {type(current).__name__}, expected {p.value_type.__name__}"]
    out = []
    if p.params is not None:
        if not callable(current):
            return [f"{p.where} is not callable"]
        try:
            names = tuple(inspect.signature(current).parameters)
        except (TypeError, ValueError):
            names = ()
        if names[: len(p.params)] != p.params:
            out.append(f"{p.where} takes ({', '.join(names)}), expected ({', '.join(p.params)}, ...)")
    if p.source_has:
        target = p.source_of or current
        try:
            source = inspect.getsource(target)
        except (OSError, TypeError):
            source = ""
        out += [f"{p.where} no longer contains {frag!r}" for frag in p.source_has
                if frag not in source]
    return out


def check(patches: tuple[Patch, ...] = PATCHES, version: str | None = None) -> list[str]:
    """Every way the installed Faust differs from what `patches` assume, as sentences
    (empty when all is as tested). `version` defaults to the installed one."""
    version = faust.__version__ if version is None else version
    problems = []
    if version != TESTED_VERSION:
        problems.append(f"faust-streaming is {version}, but mailflow's patches were written "
                        f"and tested for {TESTED_VERSION}")
    if aiokafka.__version__ != TESTED_AIOKAFKA:
        problems.append(f"aiokafka is {aiokafka.__version__}, but mailflow's patches were written "
                        f"and tested for {TESTED_AIOKAFKA}")
    for p in patches:
        problems += _problems_of(p)
    return problems


def install(patches: tuple[Patch, ...] = PATCHES) -> None:
    """Check, then install every patch (once per process; later calls do nothing).

    Raises `FaustCompatError` listing every problem `check` found, before changing
    anything."""
    problems = check(patches)
    if problems:
        raise FaustCompatError(
            "mailflow cannot run its stages on this Faust: " + "; ".join(problems)
            + f". Install faust-streaming=={TESTED_VERSION} and aiokafka=={TESTED_AIOKAFKA} "
            "(pyproject.toml pins both), or "
            "port the patches in streams/faust_compat.py to this version first.")
    for p in patches:
        if p.replacement is None or (p.owner, p.name) in _originals:
            continue
        _originals[(p.owner, p.name)] = inspect.getattr_static(p.owner, p.name)
        setattr(p.owner, p.name, p.replacement)


def installed() -> bool:
    """Whether this process's Faust has mailflow's patches."""
    return bool(_originals)
