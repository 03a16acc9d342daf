from pathlib import Path

from streams.app import mark_clean_shutdown, reset_tables_after_crash


def test_tables_are_dropped_after_a_crash_and_kept_after_a_clean_stop(tmp_path: Path):
    tables = tmp_path / "v1" / "tables"
    (tables / "mailboxes-0.db").mkdir(parents=True)
    # First start ever: no mark, no harm (nothing there yet would be the usual case).
    assert reset_tables_after_crash(tmp_path, tables) is True
    assert not tables.exists()

    (tables / "mailboxes-0.db").mkdir(parents=True)
    mark_clean_shutdown(tmp_path)
    assert reset_tables_after_crash(tmp_path, tables) is False
    assert (tables / "mailboxes-0.db").exists()
    # The mark is consumed at start: a kill -9 during this run drops the tables next time.
    assert reset_tables_after_crash(tmp_path, tables) is True
    assert not tables.exists()
    assert reset_tables_after_crash(tmp_path, tables) is False  # nothing to drop


class _Exited(Exception):
    pass


async def test_a_commit_that_never_returns_makes_the_replica_exit(monkeypatch):
    import asyncio

    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    from streams import app

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
    assert AIOKafkaConsumerThread.commit is app._commit_or_exit  # installed on import
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
    from streams.app import _new_offset_from_base as new_offset

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
    from streams.app import hole_start

    assert hole_start(5, [42, 43], in_flight=[]) == 5  # 5..41 fetched and dropped
    assert hole_start(5, [42, 43], in_flight=[7]) is None  # 7 still being handled
    assert hole_start(5, [42, 43], in_flight=[50]) == 5  # in flight above the acks: no help
    assert hole_start(5, [5, 6], in_flight=[]) is None  # no hole
    assert hole_start(None, [42], in_flight=[]) is None  # no base known: nothing to judge
    assert hole_start(5, [], in_flight=[]) is None


async def test_a_hole_is_sought_back_after_the_grace_period_only():
    from types import SimpleNamespace

    from streams.app import HOLE_GRACE, refetch_holes

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
