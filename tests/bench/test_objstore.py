"""bench/objstore.py: every writer puts every body, and the medians name each."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

_spec = importlib.util.spec_from_file_location(
    "objstore_bench", Path(__file__).resolve().parents[2] / "bench" / "objstore.py")
assert _spec and _spec.loader
objstore_bench: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(objstore_bench)


def test_a_short_run_writes_every_body_every_way(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert objstore_bench.main(["--count", "30", "--concurrency", "1,7", "--size", "500",
                                "--rounds", "2", "--dir", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(doc["medians"]) == {"mailflow@1", "mailflow@7", "packed@1", "packed@7", "obstore@1", "obstore@7"}
    assert all(m["cpu_ms_per_body"] > 0 and m["wall_ms_per_body"] > 0 for m in doc["medians"].values())


async def test_a_round_leaves_each_body_readable(tmp_path: Path) -> None:
    from mailflow import objstore

    url = (tmp_path / "m").absolute().as_uri()
    await objstore_bench.one_round("mailflow", url, count=12, concurrency=5, size=100)
    bodies = [await objstore.get_body(url, objstore.body_key(f"mailflow{i:08d}")) for i in range(12)]
    assert all(len(b) == 100 for b in bodies)
    names = sorted(p.name for p in (tmp_path / "m" / "messages").iterdir())  # noqa: ASYNC240 (a test's dir)
    assert names[:2] == [
        "mailflow-0000001.eml", "mailflow00000000.eml"]


async def test_a_packed_round_writes_a_pack_per_turn(tmp_path: Path) -> None:
    url = (tmp_path / "p").absolute().as_uri()
    await objstore_bench.one_round("packed", url, count=12, concurrency=5, size=100)
    packs = sorted((tmp_path / "p" / "packs").rglob("*.pack"),  # noqa: ASYNC240 (a test's dir)
                   key=lambda p: int(p.stem.rsplit("-", 1)[1]))  # in the order written
    assert [p.stat().st_size for p in packs] == [100, 500, 500, 200]  # the warm-up's body, then turns of 5
