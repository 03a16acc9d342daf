"""streams/feed.py: batches straight from Faust's consumer, and what it keeps of
Faust's guarantees: offsets acked only after a batch is handled, never for one
whose handling raised, records of an old generation or cleared on a revoke never
acked, back-pressure per partition, and the conductor's callback choice."""

from __future__ import annotations

import asyncio
import weakref
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.types import TP
from faust.types.tuples import ConsumerMessage
from mode.utils.queues import FlowControlEvent

from streams import feed as feed_mod
from streams.feed import Feed


class _Consumer:
    """The part of Faust's consumer a feed uses, recording what it was told."""

    def __init__(self) -> None:
        self._unacked_messages: weakref.WeakSet[Any] = weakref.WeakSet()
        self.acked: list[int] = []
        self.full: list[TP] = []
        self.drop: list[TP] = []

    def ack(self, message: Any) -> bool:  # Faust's Consumer.ack, reduced to a record
        message.acked = True
        self._unacked_messages.discard(message)
        self.acked.append(message.offset)
        return True

    def on_buffer_full(self, tp: TP) -> None:
        assert isinstance(tp, TP)  # Faust asserts it too
        self.full.append(tp)

    def on_buffer_drop(self, tp: TP) -> None:
        self.drop.append(tp)


async def _ebb() -> None:
    pass


def _app(maxsize: int = 4096) -> Any:
    return SimpleNamespace(
        conf=SimpleNamespace(stream_buffer_maxsize=maxsize, Event=faust.Event),
        flow_control=FlowControlEvent(initially_suspended=False),
        consumer=_Consumer(), consumer_generation_id=1,
        monitor=SimpleNamespace(stream_inbound_time={}),
        producer=SimpleNamespace(buffer=SimpleNamespace(wait_until_ebb=_ebb)))


def _msg(offset: int, partition: int = 0, generation: int = 1) -> ConsumerMessage:
    return ConsumerMessage("t", partition, offset, 1.0, 0, [], b"k", b"v%d" % offset, None,
                           generation_id=generation)


async def test_a_fetch_handed_over_is_one_batch_of_tracked_events() -> None:
    app = _app()
    f = Feed(app, object(), max_=10, within=5.0)
    messages = [_msg(i) for i in range(3)]
    for m in messages:
        assert f.offer(m)
    waiting = asyncio.ensure_future(f.wait_batch())
    await asyncio.sleep(0.01)
    assert not waiting.done()  # the fetch is not handed over yet: more may come
    f.fetched()
    await asyncio.wait_for(waiting, 1)
    events = f.take()
    assert [ev.value for ev in events] == [b"v0", b"v1", b"v2"]
    assert [ev.message.offset for ev in events] == [0, 1, 2]
    assert set(app.consumer._unacked_messages) == set(messages)
    assert TP("t", 0) in app.monitor.stream_inbound_time
    f.ack(events)
    assert app.consumer.acked == [0, 1, 2] and not app.consumer._unacked_messages


async def test_a_full_batch_is_ready_at_once_and_records_wait_at_most_within() -> None:
    f = Feed(_app(), object(), max_=2, within=0.05)
    f.offer(_msg(0))
    f.offer(_msg(1))
    f.offer(_msg(2))
    await asyncio.wait_for(f.wait_batch(), 0.5)
    assert [ev.message.offset for ev in f.take()] == [0, 1]  # never more than max_
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(f.wait_batch(), 1)  # no fetch end: the rest after `within`
    assert loop.time() - t0 >= 0.04
    assert [ev.message.offset for ev in f.take()] == [2]


async def test_records_of_an_old_generation_or_cleared_on_revoke_are_never_acked() -> None:
    app = _app()
    f = Feed(app, object(), max_=10, within=0.01)
    stale, fresh = _msg(0, generation=0), _msg(1)
    f.offer(stale)
    f.offer(fresh)
    events = f.take()
    assert [ev.message for ev in events] == [fresh]
    assert stale not in app.consumer._unacked_messages and not stale.acked
    f.offer(_msg(2))
    app.flow_control.clear()  # what Faust does to its queues on a revoke
    assert f.take() == []
    app.flow_control.suspend()
    assert not f.offer(_msg(3))  # the fetch loop then takes Faust's awaited path


class _Channel:
    """A topic channel: iterating it is itself, as Faust's iterator topic."""

    def __aiter__(self) -> _Channel:
        return self


def _fed(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, Any]:
    """A `feed.batches` generator over a fake app: (app, channel, generator)."""
    app = _app()
    app.topics = SimpleNamespace(_update_callback_map=lambda: None, discard=lambda c: None)
    channel = _Channel()
    monkeypatch.setattr(feed_mod, "supported", lambda s: True)
    return app, channel, feed_mod.batches(SimpleNamespace(app=app, channel=channel), 10, 0.01)


async def test_a_batch_is_acked_only_when_the_next_is_asked_for(monkeypatch) -> None:
    app, channel, gen = _fed(monkeypatch)
    first = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0)
    f = feed_mod.FEEDS[channel]
    f.offer(_msg(0))
    f.offer(_msg(1))
    f.fetched()
    events = await asyncio.wait_for(first, 1)
    assert len(events) == 2 and app.consumer.acked == []  # being handled
    f.offer(_msg(2))
    f.fetched()
    await asyncio.wait_for(gen.__anext__(), 1)
    assert app.consumer.acked == [0, 1]
    await gen.aclose()  # the second batch was not handled: not acked
    assert app.consumer.acked == [0, 1]
    assert channel not in feed_mod.FEEDS and channel in feed_mod.ENDED


async def test_a_batch_whose_handling_raised_is_not_acked_and_not_waited_for(monkeypatch) -> None:
    app, channel, gen = _fed(monkeypatch)
    first = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0)
    f = feed_mod.FEEDS[channel]
    for i in range(3):
        f.offer(_msg(i))
    f.fetched()
    events = await asyncio.wait_for(first, 1)
    assert len(app.consumer._unacked_messages) == 3
    with pytest.raises(RuntimeError):
        await gen.athrow(RuntimeError("handler bug"))
    assert app.consumer.acked == []  # no commit may pass them
    assert not app.consumer._unacked_messages  # a rebalance's wait_empty does not hang
    assert all(not ev.message.acked for ev in events)


async def test_a_full_buffer_takes_its_partitions_out_of_the_fetch_until_drained() -> None:
    app = _app(maxsize=4)
    f = Feed(app, object(), max_=2, within=0.01)
    for i in range(5):
        f.offer(_msg(i, partition=i % 2))
    assert app.consumer.full == [TP("t", 1), TP("t", 0)]  # at 4 and 5 buffered
    f.take()  # 3 left: above 40 % of 4
    assert app.consumer.drop == []
    f.take()  # 1 left
    assert sorted(app.consumer.drop) == [TP("t", 0), TP("t", 1)]


async def test_the_conductor_gives_a_fed_partition_the_feed_and_ended_feeds_nothing(monkeypatch) -> None:
    from streams import faust_compat

    built: list[set[Any]] = []
    monkeypatch.setattr(faust_compat, "_faust_build_handler",
                        lambda self, tp, channels: built.append(set(channels)) or "faust")
    fed, other = _Channel(), _Channel()
    f = Feed(_app(), fed, max_=10, within=0.01)
    monkeypatch.setitem(feed_mod.FEEDS, fed, f)
    build = faust_compat._build_handler_feeding
    assert build(None, TP("t", 0), {fed}) is f
    assert build(None, TP("t", 0), {other}) == "faust" and built[-1] == {other}
    shared = build(None, TP("t", 0), {fed, other})
    assert callable(shared) and shared is not f and built[-1] == {other}


async def test_a_channel_whose_feed_ended_gets_no_callback_of_faust() -> None:
    from streams import faust_compat

    class Channel:
        pass

    ended, other = Channel(), Channel()
    feed_mod.ENDED.add(ended)
    built: list[set[Any]] = []
    original = faust_compat._faust_build_handler
    faust_compat._faust_build_handler = lambda self, tp, channels: built.append(set(channels))
    try:
        faust_compat._build_handler_feeding(None, TP("t", 0), {ended, other})
    finally:
        faust_compat._faust_build_handler = original
    assert built == [{other}]
