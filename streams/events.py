"""Status events sent a partition at a time: one ``events`` record per partition per
turn of a stage's event loop.

A remote message makes six status events (accepted, validated, scanned, two
sent_folder, delivered). One record each cost, per event, a produce call and a
delivery report in the stage that made it, a record in the broker, and in each of
the two stages that read ``events`` (status and webhooks) a trip through Faust's
consumer and the stage's batch: those two stages used a fifth of a message's CPU
(docs/BENCHMARKS.md, session 14). A stage's batch runs every record's handler up
to its first wait before the loop turns (`streams.runtime.Stage.process_batch`),
so the events of a batch are all here when the turn ends; `EventBatcher` then
sends those of each partition as one record.

What a record on ``events`` is (readers take both: `schemas.records.parse_events`,
`schemas.records.event_dicts`):

- one event (``event.v1.json``), key: its message id, when a turn made one event
  for that partition, or when the topic's partition count is not known yet (the
  first moments after a start, or a broker that does not answer);
- an event batch (``event-batch.v1.json``: ``{"events": [event, ...]}``, in the
  order they were made), no key, in the partition each of its message ids maps to
  as a keyed record would (`mailflow.kafka_io.partition_of`).
  A message's status still lives in its id's partition, and a message's events
  from one stage stay in order.

Lag on ``events`` counts these records, not events. Every caller gets the future
of the record its event went into: the runtime acks an input only once every
record it produced is acknowledged, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from mailflow.kafka_io import partition_of

# A batch record stays well under the producer's message.max.bytes (2 MiB) and a
# reader's fetch: a full one is sent at once, the rest of the turn starts another.
MAX_EVENTS = 500
MAX_BYTES = 512 * 1024

Produce = Callable[[str, bytes | None, bytes, int | None], "asyncio.Future[tuple[int, int]]"]


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[tuple[int, int]]
    keys: list[bytes] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    size: int = 0


class EventBatcher:
    """Collects one loop turn's events for `topic` and sends them a record per
    partition (`produce(topic, key, value, partition)` returns the ack's future)."""

    def __init__(self, produce: Produce, topic: str, max_events: int = MAX_EVENTS,
                 max_bytes: int = MAX_BYTES) -> None:
        self._produce = produce
        self.topic = topic
        self.partitions: int | None = None  # set once known (`Stage`): until then, one record each
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._pending: dict[int, _Pending] = {}

    def add(self, key: bytes, value: bytes) -> asyncio.Future[tuple[int, int]]:
        """Queue one event (its message id, its JSON); the future resolves to the
        (partition, offset) of the record that carries it, once acknowledged."""
        n = self.partitions
        if not n or not key:
            return self._produce(self.topic, key, value, None)
        p = partition_of(key, n)
        pend = self._pending.get(p)
        if pend is not None and (len(pend.values) >= self._max_events
                                 or pend.size + len(value) > self._max_bytes):
            del self._pending[p]
            self._send(p, pend)
            pend = None
        if pend is None:
            loop = asyncio.get_running_loop()
            if not self._pending:  # the turn's first: sent when the turn ends
                loop.call_soon(self.flush)
            pend = self._pending[p] = _Pending(loop.create_future())
        pend.keys.append(key)
        pend.values.append(value)
        pend.size += len(value)
        return pend.future

    def flush(self) -> None:
        """Send what is queued now (at the end of the turn that queued it)."""
        pending, self._pending = self._pending, {}
        for p, pend in pending.items():
            self._send(p, pend)

    def _send(self, partition: int, pend: _Pending) -> None:
        if len(pend.values) == 1:
            fut = self._produce(self.topic, pend.keys[0], pend.values[0], partition)
        else:
            fut = self._produce(self.topic, None, b'{"events":[' + b",".join(pend.values) + b"]}",
                                partition)
        fut.add_done_callback(partial(_settle, pend.future))


def _settle(target: asyncio.Future[tuple[int, int]], fut: asyncio.Future[tuple[int, int]]) -> None:
    if target.done():
        return
    if fut.cancelled():
        target.cancel()
    elif (exc := fut.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(fut.result())
