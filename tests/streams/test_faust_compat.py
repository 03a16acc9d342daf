"""streams/faust_compat.py: the check that Faust is the one the patches were written
for, what installing them changes, and the commit-base and hole protections."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from faust.transport.consumer import Consumer

from streams import faust_compat
from streams.faust_compat import FaustCompatError, Patch

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_faust_is_the_tested_one_and_has_every_patched_attribute() -> None:
    assert faust_compat.check() == []
    pinned = [line for line in (ROOT / "pyproject.toml").read_text().splitlines()
              if '"faust-streaming' in line]
    assert pinned and f'"faust-streaming=={faust_compat.TESTED_VERSION}"' in pinned[0]


def test_another_faust_version_is_refused_by_name() -> None:
    problems = faust_compat.check(version="0.16.0")
    assert problems == ["faust-streaming is 0.16.0, but mailflow's patches were written "
                        f"and tested for {faust_compat.TESTED_VERSION}"]


def test_another_aiokafka_version_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import aiokafka

    monkeypatch.setattr(aiokafka, "__version__", "0.15.0")
    assert faust_compat.check() == ["aiokafka is 0.15.0, but mailflow's patches were written "
                                    f"and tested for {faust_compat.TESTED_AIOKAFKA}"]
    pinned = [line for line in (ROOT / "pyproject.toml").read_text().splitlines()
              if '"aiokafka' in line]
    assert pinned and f'"aiokafka=={faust_compat.TESTED_AIOKAFKA}"' in pinned[0]


class _StandIn:
    """A class shaped like one of Faust's after a refactor."""

    max_messages = "100"

    def _new_offset(self, partition):  # renamed parameter
        return None

    def perform_seek(self):
        return self._seek_all()  # no longer awaits seek_to_committed


def test_a_missing_or_reshaped_attribute_is_named_in_the_failure() -> None:
    patches = (
        Patch(_StandIn, "_drain_messages", lambda self: None, "r", "u", params=("self",)),
        Patch(_StandIn, "max_messages", 10_000, "r", "u", value_type=int),
        Patch(_StandIn, "_new_offset", lambda self, tp: None, "r", "u", params=("self", "tp")),
        Patch(_StandIn, "perform_seek", lambda self: None, "r", "u", params=("self",),
              source_has=("await self.seek_to_committed()",)),
    )
    where = f"{__name__}._StandIn"
    problems = faust_compat.check(patches, version=faust_compat.TESTED_VERSION)
    assert problems == [
        f"{where}._drain_messages is missing",
        f"{where}.max_messages is str, expected int",
        f"{where}._new_offset takes (self, partition), expected (self, tp, ...)",
        f"{where}.perform_seek no longer contains 'await self.seek_to_committed()'",
    ]
    with pytest.raises(FaustCompatError, match=r"cannot run its stages on this Faust: .*"
                       r"_drain_messages is missing.*faust-streaming==0\.15\.3"):
        faust_compat.install(patches)
    assert _StandIn.max_messages == "100"  # nothing was patched


def test_importing_the_api_or_the_stage_modules_patches_nothing() -> None:
    # A fresh interpreter: this test process may have installed the patches already.
    code = (
        "import mailflow.api.server, mailflow.api.inflow, streams.app, streams.runtime\n"
        "from faust.transport.consumer import Consumer\n"
        "from faust.transport.producer import ProducerBuffer\n"
        "from streams import faust_compat\n"
        "assert not faust_compat.installed()\n"
        "assert Consumer._new_offset.__module__ == 'faust.transport.consumer'\n"
        "assert ProducerBuffer.max_messages == 100\n"
        "faust_compat.install()\n"
        "assert Consumer._new_offset is faust_compat._new_offset_from_base\n"
        "assert ProducerBuffer.max_messages == faust_compat.PRODUCER_BUFFER_MAX\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_install_is_idempotent_and_keeps_faust_originals_to_call_through() -> None:
    faust_compat.install()
    faust_compat.install()
    assert Consumer.__init__ is faust_compat._init_without_read_offsets
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    assert AIOKafkaConsumerThread._create_worker_consumer is faust_compat._worker_consumer_short_poll
    assert faust_compat._consumer_init.__module__ == "faust.transport.consumer"
    assert faust_compat.check() == []  # the originals' shapes are still what is checked


class _Exited(Exception):
    pass


async def test_a_commit_that_never_returns_makes_the_replica_exit(monkeypatch):
    import asyncio

    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    from streams import faust_compat as app

    calls: list[object] = []

    async def hangs(self, offsets):
        calls.append(offsets)
        await asyncio.Event().wait()

    async def returns(self, offsets):
        return True

    def exit_(code: int) -> None:
        raise _Exited(code)

    monkeypatch.setattr(app, "COMMIT_STUCK", 0.05)
    monkeypatch.setattr(app.os, "_exit", exit_)
    app.install()
    assert AIOKafkaConsumerThread.commit is app._commit_or_exit
    monkeypatch.setattr(app, "_thread_commit", returns)
    assert await app._commit_or_exit(None, {"tp": 1}) is True
    monkeypatch.setattr(app, "_thread_commit", hangs)
    try:
        await app._commit_or_exit(None, {"tp": 2})
    except _Exited as exc:
        assert exc.args == (75,)
    else:
        raise AssertionError("a stuck commit did not end the process")
    assert calls == [{"tp": 2}]


class _Offsets:
    """The part of a Faust consumer the commit decision reads."""

    def __init__(self, committed: int | None, acked: list[int], seek_base: int | None = None) -> None:
        from collections import defaultdict

        from intervaltree import IntervalTree

        self._committed_offset = defaultdict(lambda: None, {"tp": committed})
        self._acked = defaultdict(list, {"tp": sorted(acked)})
        self._acked_index = defaultdict(set, {"tp": set(acked)})
        self._gap = defaultdict(IntervalTree)
        if seek_base is not None:
            self._seek_base = {"tp": seek_base}


def test_a_commit_never_passes_a_record_still_in_flight():
    from streams.faust_compat import _new_offset_from_base as new_offset

    # Committed 10 (the next to read): 10 still handled while 11 and 12 are done.
    # Faust's own check let this commit 13, past 10.
    assert new_offset(_Offsets(10, [11, 12]), "tp") is None
    assert new_offset(_Offsets(10, [10, 11, 12, 14]), "tp") == 13
    # Committed at 0, which Faust reads as none: 0..4 in flight, 5 and 6 done.
    assert new_offset(_Offsets(None, [5, 6], seek_base=0), "tp") is None
    assert new_offset(_Offsets(None, [0, 1, 2], seek_base=0), "tp") == 3
    # No committed offset known at all: Faust's rule (the run of consecutive acks).
    assert new_offset(_Offsets(None, [5, 6]), "tp") == 7


def test_a_hole_is_read_again_only_when_nothing_below_the_acks_is_in_flight():
    from streams.faust_compat import hole_start

    assert hole_start(5, [42, 43], in_flight=[]) == 5  # 5..41 fetched and dropped
    assert hole_start(5, [42, 43], in_flight=[7]) is None  # 7 still being handled
    assert hole_start(5, [42, 43], in_flight=[50]) == 5  # in flight above the acks: no help
    assert hole_start(5, [5, 6], in_flight=[]) is None  # no hole
    assert hole_start(None, [42], in_flight=[]) is None  # no base known: nothing to judge
    assert hole_start(5, [], in_flight=[]) is None


async def test_a_hole_is_sought_back_after_the_grace_period_only():
    from types import SimpleNamespace

    from streams.faust_compat import HOLE_GRACE, refetch_holes

    sought: list[tuple[str, int]] = []

    async def seek(tp, offset):
        sought.append((tp, offset))

    consumer = _Offsets(5, [42, 43])
    consumer.flow_active = True
    consumer._unacked_messages = set()
    consumer.seek = seek
    app = SimpleNamespace(consumer=consumer, rebalancing=False)
    seen: dict = {}
    assert await refetch_holes(app, seen, now=100.0) == []  # first seen: wait
    assert await refetch_holes(app, seen, now=100.0 + HOLE_GRACE - 1) == []
    assert await refetch_holes(app, seen, now=100.0 + HOLE_GRACE) == [("tp", 5)]
    assert sought == [("tp", 5)]

    # A record below the acks still being handled: not a hole, however long.
    consumer._unacked_messages = [SimpleNamespace(tp="tp", offset=7, acked=False)]
    seen.clear()
    assert await refetch_holes(app, seen, now=0.0) == []
    assert await refetch_holes(app, seen, now=60.0) == []
    # Mid-rebalance nothing is judged (Faust seeks to the commit itself afterwards).
    consumer._unacked_messages = set()
    app.rebalancing = True
    assert await refetch_holes(app, seen, now=0.0) == []
    assert await refetch_holes(app, seen, now=60.0) == []


def test_records_fetched_and_dropped_past_every_ack_are_found() -> None:
    from streams.faust_compat import dropped_start

    # Fetched up to 225, committed at 122, nothing of it buffered, in flight or acked:
    # the chaos run's stuck partition (session 10), which hole_start cannot see.
    assert dropped_start(122, 225, acked=[121], in_flight=[], buffered=False) == 122
    assert dropped_start(122, 122, acked=[121], in_flight=[], buffered=False) is None  # all read
    assert dropped_start(122, 225, acked=[121], in_flight=[130], buffered=False) is None
    assert dropped_start(122, 225, acked=[121], in_flight=[], buffered=True) is None
    assert dropped_start(122, 225, acked=[150], in_flight=[], buffered=False) is None  # hole_start's
    assert dropped_start(None, 225, acked=[], in_flight=[], buffered=False) is None
    assert dropped_start(122, None, acked=[], in_flight=[], buffered=False) is None


async def test_a_feed_partition_read_past_its_commit_with_nothing_left_is_read_again() -> None:
    from collections import deque
    from types import SimpleNamespace

    from streams.faust_compat import HOLE_GRACE, fetch_position, refetch_holes
    from streams.feed import Feed

    sought: list[tuple[str, int]] = []
    positions = {"tp": 225}

    async def seek(tp, offset):
        sought.append((tp, offset))

    def state_value(tp):
        return SimpleNamespace(has_valid_position=True, position=positions[tp])

    consumer = _Offsets(122, [121])
    consumer.flow_active = True
    consumer._unacked_messages = set()
    consumer.seek = seek
    assignment = SimpleNamespace(state_value=state_value)
    consumer._thread = SimpleNamespace(_consumer=SimpleNamespace(
        _subscription=SimpleNamespace(subscription=SimpleNamespace(assignment=assignment))))
    feed = Feed.__new__(Feed)
    feed.buffer = deque()
    app = SimpleNamespace(consumer=consumer, rebalancing=False,
                          topics=SimpleNamespace(_tp_to_callback={"tp": feed}))
    assert fetch_position(consumer, "tp") == 225
    seen: dict = {}
    assert await refetch_holes(app, seen, now=100.0) == []  # first seen: wait
    feed.buffer.append(SimpleNamespace(tp="tp"))  # the stage has records of it to take
    assert await refetch_holes(app, seen, now=100.0 + HOLE_GRACE) == []
    feed.buffer.clear()
    assert await refetch_holes(app, seen, now=200.0) == []  # seen anew
    assert await refetch_holes(app, seen, now=200.0 + HOLE_GRACE) == [("tp", 122)]
    assert sought == [("tp", 122)]
    # The same state again after the seek (offsets without records, as a transaction's
    # markers): not sought again and again.
    assert await refetch_holes(app, seen, now=300.0) == []
    assert await refetch_holes(app, seen, now=300.0 + HOLE_GRACE) == []
    # Once the commit moves, a new hole is judged anew.
    consumer._committed_offset["tp"] = 230
    positions["tp"] = 240
    assert await refetch_holes(app, seen, now=400.0) == []
    assert await refetch_holes(app, seen, now=400.0 + HOLE_GRACE) == [("tp", 230)]


async def test_a_stream_partition_read_past_its_commit_with_nothing_left_is_read_again() -> None:
    # The deliver stage's agents iterate Faust streams, not feeds: after a recovery in
    # a cluster chaos run its partition stood fetched at 75, committed at 24, nothing
    # queued, in flight or acked, until the drain timed out (/debug/consumer).
    import asyncio
    from types import SimpleNamespace

    from streams.faust_compat import HOLE_GRACE, refetch_holes

    sought: list[tuple[str, int]] = []

    async def seek(tp, offset):
        sought.append((tp, offset))

    consumer = _Offsets(24, [])
    consumer.flow_active = True
    consumer._unacked_messages = set()
    consumer.seek = seek
    assignment = SimpleNamespace(state_value=lambda tp: SimpleNamespace(has_valid_position=True, position=75))
    consumer._thread = SimpleNamespace(_consumer=SimpleNamespace(
        _subscription=SimpleNamespace(subscription=SimpleNamespace(assignment=assignment))))
    queue: asyncio.Queue = asyncio.Queue()
    channel = SimpleNamespace(_queue=queue)
    app = SimpleNamespace(consumer=consumer, rebalancing=False,
                          topics=SimpleNamespace(_tp_to_callback={"tp": object()},
                                                 _tp_index={"tp": [channel]}))
    seen: dict = {}
    assert await refetch_holes(app, seen, now=100.0) == []  # first seen: wait
    queue.put_nowait(SimpleNamespace(message=SimpleNamespace(tp="tp")))  # queued for the stream
    assert await refetch_holes(app, seen, now=100.0 + HOLE_GRACE) == []
    queue.get_nowait()
    assert await refetch_holes(app, seen, now=200.0) == []
    # The fetch loop is handing out a fetch (blocked on a full queue, say): not judged.
    consumer._handing_out = True
    assert await refetch_holes(app, seen, now=200.0 + HOLE_GRACE) == []
    consumer._handing_out = False
    assert await refetch_holes(app, seen, now=300.0) == []
    assert await refetch_holes(app, seen, now=300.0 + HOLE_GRACE) == [("tp", 24)]
    assert sought == [("tp", 24)]


async def test_run_eagerly_finishes_what_never_waits_without_a_task() -> None:
    import asyncio

    async def hand_on(x: int) -> int:
        return x + 1

    assert faust_compat.run_eagerly(hand_on(1)) == (True, 2)

    async def waits(fut: asyncio.Future[int]) -> int:
        return await fut + 1

    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    done, task = faust_compat.run_eagerly(waits(fut))
    assert not done and isinstance(task, asyncio.Task)
    fut.set_result(41)
    assert await task == 42


async def test_run_eagerly_raises_early_failures_and_keeps_one_context_throughout() -> None:
    import asyncio
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="outside")

    async def fails() -> None:
        raise ValueError("bad record")

    with pytest.raises(ValueError, match="bad record"):
        faust_compat.run_eagerly(fails())

    async def sets_across_a_wait() -> str:
        token = var.set("inside")
        await asyncio.sleep(0)
        seen = var.get()
        var.reset(token)  # a token is only valid in the context that made it
        return seen

    ctx = contextvars.copy_context()
    done, task = faust_compat.run_eagerly(sets_across_a_wait(), ctx)
    assert not done
    assert await task == "inside"
    assert var.get() == "outside"  # the caller's context is untouched


async def test_a_task_of_the_rest_can_be_cancelled_while_it_waits() -> None:
    import asyncio

    cleaned: list[str] = []

    async def waits_forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append("finally ran")

    done, task = faust_compat.run_eagerly(waits_forever())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["finally ran"]


async def test_a_stage_off_the_mail_path_fetches_in_larger_answers(monkeypatch, tmp_path) -> None:
    """Stages reading the status events ask the broker for fuller, rarer answers; the
    mail's stages are answered at once."""
    from types import SimpleNamespace

    import aiokafka
    import faust

    from agents import deliver, status, webhooks
    from mailflow.config import Settings

    def faust_made(self, transport):  # Faust's own consumer, as it builds it
        return aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", fetch_max_wait_ms=1500)

    monkeypatch.setattr(faust_compat, "_faust_worker_consumer", faust_made)
    settings = Settings(data_dir=tmp_path, scanners=())
    made = {}
    for module in (deliver, status, webhooks):
        app = faust.App(f"fetch-{module.STAGE}", broker="kafka://127.0.0.1:1", store="memory://",
                        datadir=str(tmp_path / module.STAGE))
        module.register(app, settings)
        c = faust_compat._worker_consumer_short_poll(SimpleNamespace(app=app), None)
        made[module.STAGE] = (c._fetch_min_bytes, c._fetch_max_wait_ms)
    assert made == {"deliver": (1, faust_compat.FETCH_MAX_WAIT_MS),
                    "status": (64 * 1024, 200), "webhooks": (64 * 1024, 200)}
