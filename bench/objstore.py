"""Body writes to a file object store: mailflow's writer against obstore's, side by side.

Usage::

    python bench/objstore.py                          # 2000 bodies a round, 3 rounds
    python bench/objstore.py --count 5000 --concurrency 1,20 --size 4096 --rounds 5

Each round writes ``--count`` bodies of ``--size`` bytes into a fresh directory
under ``--dir`` (default: the system's temporary directory), ``--concurrency`` at a
time (as many puts as a stage's batch makes in one turn of its event loop), once
through `mailflow.objstore.put_body` and once through obstore's ``put_async``, in
alternating order. It prints, per round, concurrency and writer, the CPU of this
process (every thread) and the wall time per body, then the medians, ending with
one JSON line. Run it on the disk the stack's ``MAILFLOW_DATA_DIR`` is on, and
while a stack is busy to see the file system's journal under load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import obstore  # noqa: E402

from mailflow import objstore  # noqa: E402


async def one_round(writer: str, url: str, count: int, concurrency: int, size: int) -> dict[str, float]:
    """Write `count` bodies into the ``file://`` store `url` with `writer` (``mailflow``
    or ``obstore``)."""
    body = os.urandom(size)
    store = objstore.open_store(url)

    def put(i: int) -> Any:
        key = objstore.body_key(f"{writer}{i:08d}")
        if writer == "mailflow":
            return objstore.put_body(url, key, body)
        return obstore.put_async(store, key, body)

    await put(-1)  # the directory made, the store opened: not in the figures
    cpu, wall = time.process_time(), time.perf_counter()
    for start in range(0, count, concurrency):
        await asyncio.gather(*(put(i) for i in range(start, min(count, start + concurrency))))
    return {"cpu_ms_per_body": round((time.process_time() - cpu) / count * 1e3, 4),
            "wall_ms_per_body": round((time.perf_counter() - wall) / count * 1e3, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--concurrency", default="1,20", help="comma list: bodies put at a time")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the rounds' directories go")
    a = p.parse_args(argv)
    levels = [int(c) for c in a.concurrency.split(",")]
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        for r in range(a.rounds):
            for level in levels:
                order = ("mailflow", "obstore") if r % 2 == 0 else ("obstore", "mailflow")
                for writer in order:
                    url = Path(tmp, f"r{r}-{level}-{writer}").absolute().as_uri()
                    res = asyncio.run(one_round(writer, url, a.count, level, a.size))
                    runs.setdefault(f"{writer}@{level}", []).append(res)
                    print(f"round {r + 1} concurrency {level:3d} {writer:8s} "
                          f"cpu {res['cpu_ms_per_body']:.3f} ms  wall {res['wall_ms_per_body']:.3f} ms",
                          flush=True)
    medians = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
    for level in levels:
        ours, theirs = medians[f"mailflow@{level}"], medians[f"obstore@{level}"]
        print(f"median, concurrency {level}: mailflow {ours['cpu_ms_per_body']:.3f} ms CPU, "
              f"obstore {theirs['cpu_ms_per_body']:.3f} ms "
              f"({ours['cpu_ms_per_body'] / theirs['cpu_ms_per_body']:.2f})")
    print(json.dumps({"count": a.count, "size": a.size, "rounds": a.rounds, "medians": medians}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
