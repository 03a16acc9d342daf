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
