"""bench/hop.py's pure parts: its command line and its summary of runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

_spec = importlib.util.spec_from_file_location(
    "hop", Path(__file__).resolve().parents[2] / "bench" / "hop.py")
assert _spec and _spec.loader
hop: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hop)


def test_defaults_are_the_issues_hop() -> None:
    args = hop.parse_args([])
    assert (args.count, args.size, args.runs) == (50_000, 4096, 3)
    assert args.modes == ["librdkafka", "aiokafka", "stage"]
    assert args.prefix.startswith("hop-") and args.prefix.endswith(".")


def test_modes_are_chosen_and_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert hop.parse_args(["--modes", "stage, librdkafka"]).modes == ["stage", "librdkafka"]
    assert hop.parse_args(["--modes", "stage-each"]).modes == ["stage-each"]
    assert set(hop.STAGE_MODES) == {m for m in hop.MODES if m.startswith("stage")}  # each runs an agent mode
    with pytest.raises(SystemExit):
        hop.parse_args(["--modes", "stage,faust"])
    assert "unknown mode(s) faust" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        hop.parse_args(["--count", "0"])


def test_figures_per_record() -> None:
    f = hop.figures(50_000, cpu_s=2.5, wall_s=10.0)
    assert f["cpu_ms_per_record"] == 0.05
    assert f["records_per_s"] == 5000.0


def test_summary_takes_medians_per_mode_and_keeps_every_run() -> None:
    runs = {
        "stage": [hop.figures(1000, 0.3, 1.0), hop.figures(1000, 0.1, 0.5),
                  hop.figures(1000, 0.2, 2.0)],
        "aiokafka": [],
    }
    s = hop.summarize(runs)
    assert list(s) == ["stage"]  # a mode with no run has no figures
    assert s["stage"]["cpu_ms_per_record"] == 0.2
    assert s["stage"]["records_per_s"] == 1000.0
    assert s["stage"]["runs_cpu_ms_per_record"] == [0.3, 0.1, 0.2]
