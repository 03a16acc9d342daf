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
