"""bench/idle.py's pure parts: per-message hops and their percentiles."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

_spec = importlib.util.spec_from_file_location(
    "idle", Path(__file__).resolve().parents[2] / "bench" / "idle.py")
assert _spec and _spec.loader
idle: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(idle)


def test_hops_of_a_remote_message_in_milliseconds() -> None:
    times = {"submit": 100.0, "accepted": 100.010, "validated": 100.030, "scanned": 100.035,
             "sent_folder": 100.050, "sent_copy": 100.070, "delivered": 100.120}
    hops = idle.hop_times(times, idle.REMOTE_HOPS)
    assert hops == {"api+ratelimit": 10.0, "validate": 20.0, "scan": 5.0, "sentfolder": 15.0,
                    "deliver": 70.0, "store (Sent copy)": 20.0, "submit→delivered": 120.0}


def test_a_state_never_seen_leaves_its_hops_out() -> None:
    hops = idle.hop_times({"submit": 1.0, "accepted": 1.5}, idle.LOCAL_HOPS)
    assert hops == {"api+ratelimit": 500.0}


def test_p99_of_twenty_is_the_slowest_and_p50_the_tenth() -> None:
    per = [{"deliver": float(v)} for v in range(1, 21)]
    s = idle.summarize(per, idle.REMOTE_HOPS)
    assert s == {"deliver": {"p50": 10.0, "p99": 20.0, "max": 20.0, "n": 20}}
    assert math.isnan(idle.pct([], 0.5))
