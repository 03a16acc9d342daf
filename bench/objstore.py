"""Body writes to a file object store: mailflow's writers against obstore's, side by side.

Usage::

    python bench/objstore.py                          # 2000 bodies a round, 3 rounds
    python bench/objstore.py --count 5000 --concurrency 1,20 --size 4096 --rounds 5

Each round writes ``--count`` bodies of ``--size`` bytes into a fresh directory
under ``--dir`` (default: the system's temporary directory), ``--concurrency`` at a
time (as many puts as a stage's batch makes in one turn of its event loop), once
through `mailflow.objstore.put_body` (a file per key, ``mailflow``), once through
`mailflow.objstore.store_body` (the turn's bodies in one pack, ``packed``) and once
through obstore's ``put_async``, the order turned each round. It prints, per round,
concurrency and writer, the CPU of this process (every thread) and the wall time
per body, then the medians, ending with one JSON line. Run it on the disk the stack's ``MAILFLOW_DATA_DIR`` is on, and
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

WRITERS = ("mailflow", "packed", "obstore")


async def one_round(writer: str, url: str, count: int, concurrency: int, size: int) -> dict[str, float]:
    """Write `count` bodies into the ``file://`` store `url` with `writer` (``mailflow``,
    ``packed`` or ``obstore``)."""
    body = os.urandom(size)
    store = objstore.open_store(url)

    def put(i: int) -> Any:
        key = objstore.body_key(f"{writer}{i:08d}")
        if writer == "mailflow":
            return objstore.put_body(url, key, body)
        if writer == "packed":
            return objstore.store_body(url, f"{writer}{i:08d}", body)
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
                order = WRITERS[r % 3:] + WRITERS[:r % 3]
                for writer in order:
                    url = Path(tmp, f"r{r}-{level}-{writer}").absolute().as_uri()
                    res = asyncio.run(one_round(writer, url, a.count, level, a.size))
                    runs.setdefault(f"{writer}@{level}", []).append(res)
                    print(f"round {r + 1} concurrency {level:3d} {writer:8s} "
                          f"cpu {res['cpu_ms_per_body']:.3f} ms  wall {res['wall_ms_per_body']:.3f} ms",
                          flush=True)
    medians = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
    for level in levels:
        theirs = medians[f"obstore@{level}"]["cpu_ms_per_body"]
        print(f"median, concurrency {level}: " + ", ".join(
            f"{w} {medians[f'{w}@{level}']['cpu_ms_per_body']:.3f} ms CPU"
            f" ({medians[f'{w}@{level}']['cpu_ms_per_body'] / theirs:.2f} of obstore's)" for w in WRITERS))
    print(json.dumps({"count": a.count, "size": a.size, "rounds": a.rounds, "medians": medians}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
