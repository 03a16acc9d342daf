"""agents.common: the awaited changelog sends of an AckedTable."""

from __future__ import annotations

import faust
import pytest

from agents.common import AckedTable, acked_table, acked_writes


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch, tmp_path) -> AckedTable:
    sent: list[tuple] = []

    def send_changelog(self, partition, key, value, *args, **kwargs):  # Faust's: to Kafka
        sent.append((key, value))
        return f"future of {key}={value}"

    monkeypatch.setattr(faust.Table, "send_changelog", send_changelog)
    app = faust.App("test-acked", broker="memory://", store="memory://", datadir=str(tmp_path))
    t = acked_table(app, "counts", default=int, partitions=1)
    t.sent = sent  # type: ignore[attr-defined]
    return t


def test_an_acked_table_is_one_of_the_apps_tables(table: AckedTable):
    assert table.app.tables["counts"] is table


def test_writes_inside_acked_writes_hand_over_their_changelog_sends(table: AckedTable):
    with acked_writes() as acks:
        table.send_changelog(0, "a", 1)
        table.send_changelog(0, "b", 2)
    table.send_changelog(0, "c", 3)  # outside: sent, not collected
    assert acks == ["future of a=1", "future of b=2"]
    assert table.sent == [("a", 1), ("b", 2), ("c", 3)]  # type: ignore[attr-defined]


def test_acked_writes_nest_and_restore(table: AckedTable):
    with acked_writes() as outer:
        with acked_writes() as inner:
            table.send_changelog(0, "x", 1)
        table.send_changelog(0, "y", 1)
    assert inner == ["future of x=1"] and outer == ["future of y=1"]
