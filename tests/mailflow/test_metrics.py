"""mailflow.metrics: a batch's observations at once read as the same observations one by one."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from mailflow.metrics import observe_many


def _samples(h: Histogram) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for m in h.collect() for s in m.samples
            if not s.name.endswith("_created")]


def test_observe_many_equals_as_many_observes():
    buckets = (0.001, 0.01, 0.1)
    one, many = (Histogram("h", "h", ["stage"], buckets=buckets, registry=CollectorRegistry())
                 for _ in range(2))
    for amount, n in ((0.0004, 3), (0.05, 7), (2.0, 2)):  # the last past every bound: +Inf
        for _ in range(n):
            one.labels("s").observe(amount)
        observe_many(many.labels("s"), amount, n)
    assert _samples(many) == _samples(one)
    assert ("h_count", {"stage": "s"}, 12.0) in _samples(many)
