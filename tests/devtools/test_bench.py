"""The soak report's verdicts (devtools.bench.LagSampler.report) and the wait for the
stages to finish (devtools.bench.settle), on made-up lag."""

from __future__ import annotations

from pathlib import Path

from devtools.bench import LagSampler
from mailflow.config import Settings


def sampler(samples: list[tuple[float, dict[str, int]]]) -> LagSampler:
    s = LagSampler(Settings.from_env(), every=5.0)  # a thread, never started here
    s.samples = samples
    return s


def test_a_stage_with_ten_seconds_of_traffic_waiting_fell_behind(tmp_path: Path) -> None:
    steady = [(float(t), {"deliver": 50, "status": 300}) for t in range(0, 60, 5)]
    end = [(60.0, {"deliver": 1500, "status": 300})]
    report = sampler(steady + end).report(submit_end=60.0, rate=100, path=tmp_path / "lag.csv")
    assert report["fell_behind"] == ["deliver"]
    assert report["max"] == {"deliver": 1500, "status": 300}
    assert (tmp_path / "lag.csv").read_text().splitlines()[0] == "ts,deliver,status"


def test_status_lag_is_counted_in_events_not_messages(tmp_path: Path) -> None:
    # 1,400 events at 100 messages/s is about two seconds of the status stage's input.
    samples = [(float(t), {"status": 1400}) for t in range(0, 65, 5)]
    report = sampler(samples).report(submit_end=60.0, rate=100, path=tmp_path / "lag.csv")
    assert report["fell_behind"] == []
    samples = [(float(t), {"status": 7000}) for t in range(0, 65, 5)]
    report = sampler(samples).report(submit_end=60.0, rate=100, path=tmp_path / "lag.csv")
    assert report["fell_behind"] == ["status"]


def test_a_lag_that_keeps_growing_fell_behind(tmp_path: Path) -> None:
    # Under ten seconds of traffic at the end (900 < 1,000), but doubled over the second half.
    samples = [(float(t), {"store": t * t // 4}) for t in range(0, 65, 5)]
    report = sampler(samples).report(submit_end=60.0, rate=100, path=tmp_path / "lag.csv")
    assert report["fell_behind"] == ["store"]


def test_the_cpu_figures_wait_for_every_started_stage_to_finish(monkeypatch) -> None:
    """`settle`: the figures are read once each started stage's lag is 0, or it says
    which stages still had work when it gave up."""
    from types import SimpleNamespace

    from devtools import bench
    from mailflow.ops import lag

    asked: list[list[str]] = []
    answers = [{"status": 40, "webhooks": 3}, {"status": 2}, {}]

    def measure(settings, stages, timeout):
        asked.append(list(stages))
        left = answers.pop(0) if answers else {"status": 9}
        return [SimpleNamespace(stage=s, total=left.get(s, 0)) for s in stages]

    monkeypatch.setattr(lag, "measure", measure)
    done = bench.settle(Settings.from_env(), "status,webhooks,deliver")
    assert done["lag_left"] == {} and len(asked) == 3
    assert asked[0] == ["deliver", "status", "webhooks"]  # only what was started
    stuck = bench.settle(Settings.from_env(), "status", timeout=0.05)
    assert stuck["lag_left"] == {"status": 9} and stuck["settle_seconds"] >= 0.05
