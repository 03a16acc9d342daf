"""A stage's input in batches, straight from Faust's consumer: `batches(stream, max_, within)`.

It replaces ``stream.take_events(max_, within)`` for a stage that handles its input a
batch at a time (`streams.runtime.Stage.run_batches`) and yields the same thing: a
list of Faust events (``faust.Event``: ``.key``, ``.value``, ``.headers``,
``.message`` with ``.tp``, ``.offset``, ``.timestamp``), at most `max_` of them, in
offset order per partition. What it leaves out is Faust's machinery between the
consumer and a stream, per record: the conductor's lock and closure, the decode
through the topic's schema, the channel's queue, the stream iterator, its
processors and sensors, and the per-event acks of ``take_events``.

How records get here. Faust's conductor keeps one callback per assigned partition
(`Conductor._tp_to_callback`), built by `Conductor._build_handler` at each
assignment. For a partition whose only subscriber is a feed's channel, mailflow's
`_build_handler` (`streams.faust_compat`) returns the `Feed` itself, and Faust's
fetch loop (mailflow's `_drain_messages_eagerly`) hands each fetched record to
`Feed.offer`, a plain call that appends it to the feed's buffer, and calls
`Feed.fetched` once a fetch's records are all handed over, which is when a batch is
ready: a batch is what one fetch brought, not what arrived in a fixed wait. While
Faust's flow control is suspended (a rebalance), the offer is refused and Faust's
awaited path (`Feed.__call__`) waits for flow to resume and for Faust's producer
buffer to ebb, as the conductor does; on the plain path the producer buffer is
waited for once per batch, before the batch is taken.

What stays Faust's, unchanged: the consumer, its fetcher and its offsets. Each record
of a batch is tracked in ``Consumer._unacked_messages`` when the batch is taken (as
Faust's stream iterator does), so a rebalance's ``wait_empty`` waits for it and
`refetch_holes` counts it as in flight; its message is acked
(``Message.ack(consumer)`` → ``Consumer.ack``, the ``_acked`` bookkeeping Faust
commits from, through mailflow's commit base) only when the code that took the batch
asks for the next one, that is after every output of every record of the batch was
acknowledged (`Stage.process_batch` returns only then). Unlike ``take_events``, a
batch whose consumer raised or was cancelled is not acked: its records are untracked
and stay uncommitted, read again after a restart or by `refetch_holes`. Records that
Faust's flow control clears on a revoke (the feed is a queue managed by
``app.flow_control``, as each channel's is), and records fetched in an earlier
consumer generation, are dropped unacked: the new assignment seeks every partition to
its committed offset and reads them again (see `faust_compat.NoReadOffsets`).

Back-pressure as Faust's channel queue: past ``stream_buffer_maxsize`` buffered
records a partition is taken out of the fetch (``Consumer.on_buffer_full``) and put
back (``on_buffer_drop``) when the buffer has drained below 40 % of it.

Only for raw-bytes topics (`faust_compat.RawSchema`, every topic of the graph through
`streams.app.topic`): the event is built from the record's bytes as that schema's
decode does. On another schema, or with mailflow's Faust patches not installed,
`batches` is ``stream.take_events`` itself.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import faust
from faust.transport.consumer import ensure_TP
from faust.types import TP, AppT, EventT, Message

# The feed of each iterated channel, read by `faust_compat`'s `_build_handler`; and
# the channels of feeds that ended, which no callback delivers to any more (Faust
# would go on queueing their partitions' records where nothing reads them, and
# their offsets would never be acked).
FEEDS: weakref.WeakKeyDictionary[Any, Feed] = weakref.WeakKeyDictionary()
ENDED: weakref.WeakSet[Any] = weakref.WeakSet()

PRESSURE_DROP_RATIO = 0.40  # as mode's FlowControlQueue: fetch again below 40 % full


class Feed:
    """The buffer between Faust's fetch loop and one stage's batches (see the module
    docstring). Hashable by identity, as ``app.flow_control`` keeps its queues in a
    WeakSet."""

    def __init__(self, app: AppT, channel: Any, max_: int, within: float) -> None:
        self.app = app
        self.channel = channel
        self.max_ = max_
        self.within = within
        self.buffer: deque[Message] = deque()
        self.high = max(int(app.conf.stream_buffer_maxsize), max_)
        self.low = int(self.high * PRESSURE_DROP_RATIO)
        self.paused: set[TP] = set()  # partitions taken out of the fetch by `_put`
        self.ready = False  # a fetch finished handing its records over
        self._waiter: asyncio.Future[None] | None = None
        flow = app.flow_control
        self._flow_active = flow.is_active
        self._acquire_flow = flow.acquire
        # Faust's Consumer, whose private ack bookkeeping (`_unacked_messages`) the
        # feed keeps as Faust's own loop does: not on the ConsumerT interface.
        self._consumer: Any = app.consumer
        flow.manage_queue(self)  # type: ignore[arg-type]  # cleared on revoke, as channels

    # --- the consumer's side ----------------------------------------------------------

    def offer(self, message: Message) -> bool:
        """Take `message` now unless flow is suspended (then False: the caller awaits
        `__call__`, which waits for it)."""
        if not self._flow_active():
            return False
        self._put(message)
        return True

    async def __call__(self, message: Message) -> None:
        """The conductor's callback for this feed's partitions: Faust's own waits
        (flow control, its producer buffer), then the record is buffered."""
        await self._acquire_flow()
        await self.app.producer.buffer.wait_until_ebb()
        self._put(message)
        self.fetched()  # no fetch end follows a record that waited

    def _put(self, message: Message) -> None:
        # A reference now, as the conductor takes one per channel, so that another
        # subscriber of the partition cannot make the final ack while it is here.
        message.incref()
        buffer = self.buffer
        buffer.append(message)
        n = len(buffer)
        if n >= self.high:
            tp = ensure_TP(message.tp)  # Faust asserts its own TP type there
            if tp not in self.paused:
                self.paused.add(tp)
                self._consumer.on_buffer_full(tp)
        if n >= self.max_:
            self._wake()

    def fetched(self) -> None:
        """A fetch's records are all handed over: a batch is ready."""
        if self.buffer:
            self.ready = True
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        """Drop every buffered record (Faust's flow control, on a revoke): none was
        tracked or acked; the new assignment reads them again from the commit."""
        self.buffer.clear()
        self.ready = False

    # --- the stage's side -------------------------------------------------------------

    async def wait_batch(self) -> None:
        """Until a batch is ready: `max_` records, or a fetch's worth, or records
        waiting for `within` seconds."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while not (len(self.buffer) >= self.max_ or (self.buffer and self.ready)):
            if self.buffer and deadline is None:
                deadline = loop.time() + self.within
            waiter = self._waiter = loop.create_future()
            timer = (loop.call_at(deadline, _set_none, waiter) if deadline is not None
                     else None)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
            if deadline is not None and loop.time() >= deadline:
                break

    def take(self) -> list[EventT]:
        """Up to `max_` buffered records as events, each tracked by the consumer."""
        app = self.app
        buffer = self.buffer
        popleft = buffer.popleft
        generation = app.consumer_generation_id
        flowing = self._flow_active()
        track = self._consumer._unacked_messages.add
        event_cls: Callable[..., EventT] = app.conf.Event  # type: ignore[assignment]  # a class
        events: list[EventT] = []
        inbound: set[TP] = set()
        for _ in range(min(self.max_, len(buffer))):
            message = popleft()
            if not flowing or message.generation_id != generation:
                continue  # fetched before a rebalance: read again from the commit
            message.tracked = True
            track(message)
            events.append(event_cls(app, message.key, message.value, message.headers, message))
            inbound.add(message.tp)
        if not buffer:
            self.ready = False
        if self.paused and len(buffer) <= self.low:
            for tp in self.paused:
                self._consumer.on_buffer_drop(tp)
            self.paused.clear()
        if inbound:
            # What Faust's stream iterator tells the monitor (its slow-stream check).
            now = time.monotonic()
            inbound_time = app.monitor.stream_inbound_time
            for tp in inbound:
                inbound_time[tp] = now
        return events

    def ack(self, events: list[EventT]) -> None:
        ack(self.app, events)

    def abandon(self, events: list[EventT]) -> None:
        abandon(self.app, events)


def ack(app: AppT, events: list[EventT]) -> None:
    """Every record of `events` handled: its offset may be committed."""
    consumer = app.consumer
    for ev in events:
        ev.message.ack(consumer)


def abandon(app: AppT, events: list[EventT]) -> None:
    """`events` were not handled (the stage raised or was cancelled): untracked,
    never acked, so no commit passes them."""
    unacked = app.consumer._unacked_messages  # type: ignore[attr-defined]  # Faust's Consumer's
    for ev in events:
        unacked.discard(ev.message)


def _set_none(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def supported(stream: faust.StreamT) -> bool:
    """Whether `batches` can feed `stream` itself (else it is ``take_events``)."""
    from streams import faust_compat

    schema = getattr(stream.channel, "schema", None)
    return faust_compat.installed() and isinstance(schema, faust_compat.RawSchema)


async def batches(stream: faust.StreamT, max_: int, within: float, hold: bool = False
                  ) -> AsyncIterator[list[EventT]]:
    """The records of `stream`'s topic, a batch at a time, in place of
    ``stream.take_events(max_, within)`` (see the module docstring).

    A batch is acked when the caller asks for the next one; a caller that raises
    (or is cancelled) leaves its batch unacked and uncommitted. With `hold` (only
    where `supported`), batches are never acked here: the caller acks each with
    `ack` once it is done with it, or `abandon`s it, later and in its own order."""
    if hold and not supported(stream):
        raise ValueError("held batches need mailflow's feed (streams.faust_compat installed, raw topics)")
    if not supported(stream):
        async for events in stream.take_events(max_, within):  # type: ignore[attr-defined]  # Stream's, not StreamT's
            yield list(events)
        return
    app = stream.app
    # The iterator topic (Topic.__aiter__, as take_events gets it) subscribes with the conductor.
    channel: Any = stream.channel.__aiter__()  # the iterator topic (a TopicT, typed as an iterator)
    feed = Feed(app, channel, max_, within)
    FEEDS[channel] = feed
    conductor = app.topics
    conductor._update_callback_map()  # type: ignore[attr-defined]  # if assigned already
    ebb = app.producer.buffer.wait_until_ebb
    try:
        while True:
            await feed.wait_batch()
            # Faust's conductor waits here per record: table writes queued in Faust's
            # producer buffer past its bound hold the stage back until they drain.
            await ebb()
            events = feed.take()
            if not events:
                continue
            try:
                yield events
            except BaseException:
                feed.abandon(events)
                raise
            if not hold:
                feed.ack(events)
    finally:
        FEEDS.pop(channel, None)
        ENDED.add(channel)
        conductor.discard(channel)
        conductor._update_callback_map()  # type: ignore[attr-defined]
