"""mailflow.ops.lag.partition_lag: the one rule for a stage's queue on a partition,
used by `mailflow lag` and by the ingress's in-flow control."""

from __future__ import annotations

from mailflow.ops.lag import partition_lag


def test_lag_is_from_the_committed_offset_to_the_end() -> None:
    assert partition_lag(end=10, committed=4, start=0) == 6
    assert partition_lag(end=10, committed=10, start=0) == 0


def test_a_group_that_never_committed_has_everything_since_the_log_start_waiting() -> None:
    assert partition_lag(end=10, committed=None, start=3) == 7
    assert partition_lag(end=10, committed=-1001, start=3) == 7  # Kafka's "no offset"
    assert partition_lag(end=0, committed=None, start=0) == 0  # a fresh stack


def test_lag_is_never_negative() -> None:
    assert partition_lag(end=5, committed=8, start=0) == 0
