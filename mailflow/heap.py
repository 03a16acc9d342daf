"""What a long-running process built while it started is not walked by the collector again.

A stage or API process holds about 90,000 objects once it has started (modules,
Faust's services, aiokafka, the app) that live as long as it does. CPython's full
collections walk every one of them, and under load they come every few seconds:
the status stage spent a tenth of its CPU in the collector (thread CPU time from
``gc.callbacks``, session 11, docs/BENCHMARKS.md). `freeze_startup` collects once
and moves what survives to the permanent generation (``gc.freeze``), so later
collections walk only what was made since. Objects that were garbage at that
moment are collected first; frozen ones still die by reference count as usual.
"""

from __future__ import annotations

import gc


def freeze_startup() -> int:
    """Collect, then freeze what is left; the number of objects now frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
