"""mailflow/heap.py: what a process built while starting is frozen for the collector."""

from __future__ import annotations

import gc
import weakref

from mailflow.heap import freeze_startup


def test_what_survives_start_up_is_frozen_and_garbage_is_not() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector frees it

    kept = [Node() for _ in range(100)]
    garbage = Node()
    gone = weakref.ref(garbage)
    del garbage
    try:
        frozen = freeze_startup()
        # (Not equal to a later gc.get_freeze_count(): a frozen object may die by
        # reference count meanwhile, in another test's thread.)
        assert frozen >= 100
        # A full collection no longer walks what was frozen ...
        assert not any(o is kept[0] for o in gc.get_objects())
        # ... and the cycle that was garbage before the freeze was collected, not frozen.
        assert gone() is None
        made_after = Node()
        assert any(o is made_after for o in gc.get_objects())
    finally:
        gc.unfreeze()
