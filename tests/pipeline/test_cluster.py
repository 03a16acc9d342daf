"""The chaos run on a three-node Kafka cluster (bench/chaos.py --brokers 3): every
topic replicated 3 times with min.insync.replicas 2, the node leading the most
partitions killed -9 under load and started again, on top of the stage kills and
the SMTP and clamd outages. A short run in the default suite, a five-minute one
with a broker kill every minute marked slow. Everything real and private to the
run: the cluster (on free ports, never the shared 9092), clamd, the stages, the
API and the SMTP peer."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

_spec = importlib.util.spec_from_file_location(
    "chaos", Path(__file__).resolve().parents[2] / "bench" / "chaos.py")
assert _spec and _spec.loader
chaos: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chaos)


def test_a_stage_stalls_while_it_has_records_and_its_offsets_stand_still():
    assert chaos.stall_start(10, 10, 5, None, 100.0) == 100.0  # begins
    assert chaos.stall_start(10, 10, 5, 100.0, 101.0) == 100.0  # goes on
    assert chaos.stall_start(10, 12, 5, 100.0, 102.0) is None  # moved
    assert chaos.stall_start(10, 10, 0, 100.0, 102.0) is None  # nothing to read: idle, not stalled


def test_client_view_counts_refusals_and_delays_inside_the_failovers():
    load = SimpleNamespace(
        accepted_at=[1.0, 1.1, 9.1, 9.2],
        waited=[(0.9, 0.1), (1.0, 0.1), (3.0, 6.1), (9.0, 0.2), (20.0, 3.0)],
        failed_at=[(4.0, "503"), (30.0, "503"), (31.0, "ServerDisconnectedError")],
        why_503=chaos.Counter({"Kafka is not reachable": 2}))
    view = chaos.client_view(load, [(2.0, 10.0)])
    assert view["refused_5xx"] == {"503": 2, "ServerDisconnectedError": 1}
    assert view["refused_5xx_in_broker_failover"] == {"503": 1}
    assert view["delayed"] == 2 and view["delayed_in_broker_failover"] == 1
    assert view["longest_wait_s"] == 6.1
    assert view["longest_acceptance_gap_s"] == 8.0
    assert view["why_503"] == {"Kafka is not reachable": 2}


def _assert_survived(report: dict[str, Any], duration: float, rate: float, kills: int,
                     no_503: bool = True) -> None:
    print(report)  # the counts, for `pytest -rP`
    assert report["ok"], report["problems"]
    assert report["brokers"] == 3
    assert report["accepted_messages"] >= 0.95 * duration * rate, report
    assert report["final"].get("delivered", 0) > 0 and report["final"].get("stored", 0) > 0, report
    kinds = " ".join(report["faults"])
    for fault in ("kill -9 broker node", "back in sync", "SMTP peer down", "clamd down"):
        assert fault in kinds, report["faults"]
    assert report["broker_failovers"] >= kills, report["faults"]
    # Every submission got in: the careful client's retries of a 503 (with its
    # Idempotency-Key) were all accepted in the end, none given up on.
    assert report["refused"] == {}, report
    assert report["accepted_messages"] == int(duration * rate), report
    # No 503 at all while two of three brokers are up: the ingress holds a submission
    # through the failover (producer, idempotency read-up) and calls Kafka down only
    # when no node answers (docs/BENCHMARKS.md: 127 503s before that, none in three
    # runs after). Not asserted of the five-minute run, which saturates this machine
    # (a 3 s probe of a live broker may go unanswered there): reported.
    if no_503:
        assert "503" not in report["refused_5xx"], (report["refused_5xx"], report["why_503"])
    print(f"503s {report['refused_5xx']} (why: {report['why_503']}), delayed {report['delayed']}, "
          f"longest gap in acceptance {report['longest_acceptance_gap_s']} s, "
          f"longest stall {report['longest_stall_s']}")


def test_short_cluster_chaos_run_loses_nothing(scanners: None, work_dir: Path):
    report = chaos.run(duration=50, rate=15, kill_every=10, peer_down=12, clamd_down=8,
                       work=work_dir / "chaos-cluster-short", drain_timeout=420, seed=7,
                       brokers=3, broker_kill_every=60, broker_down=8)
    _assert_survived(report, 50, 15, kills=1)


@pytest.mark.slow
@pytest.mark.timeout(2100)
def test_cluster_chaos_run_of_five_minutes(scanners: None, work_dir: Path):
    report = chaos.run(duration=300, rate=40, kill_every=30, peer_down=60, clamd_down=30,
                       work=work_dir / "chaos-cluster-long", drain_timeout=1500, seed=11,
                       brokers=3, broker_kill_every=60, broker_down=15)
    _assert_survived(report, 300, 40, kills=3, no_503=False)  # one a minute, each after the last is in sync
