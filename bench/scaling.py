"""The scaling curve: delivered per second against partitions and deliver replicas.

For each (partitions, deliver replicas) point, `mailflow bench --start all` runs the
whole path (scanning off, 4 KB messages to 50 remote domains, smtp-sink as the peer)
on a fresh topic prefix with that many partitions; points alternate within a round,
so each round sees the same machine. Medians over rounds, and the CPU seconds per
message of each stage from the median run, which the fleet estimate in
docs/BENCHMARKS.md is built from. Ends with one JSON line.

    .venv/bin/python bench/scaling.py --count 3000 --rounds 2 --partitions 1,2,4,8 --replicas 1,2

Needs the broker (`mailflow broker`).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from devtools.bench import start_smtp_sink

ROOT = Path(__file__).resolve().parents[1]


def one(count: int, partitions: int, replicas: int, sink_port: int) -> dict[str, Any]:
    env = {**os.environ, "MAILFLOW_SMTP_ROUTES": f"*=127.0.0.1:{sink_port}", "MAILFLOW_SCANNERS": "none",
           "MAILFLOW_PARTITIONS": str(partitions)}
    stages = "ratelimit,validate,store,scan,sentfolder,retry,status," + ",".join(["deliver"] * replicas)
    cmd = [sys.executable, "-m", "mailflow.ops.cli", "bench", "--start", stages, "--count", str(count),
           "--remote-share", "1.0"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if not lines:
        raise RuntimeError(f"bench failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    doc = orjson.loads(lines[-1])
    cpu = {k: v for k, v in doc["cpu_seconds"].items() if k != "bench client"}
    return {"partitions": partitions, "replicas": replicas, "delivered_per_s": doc["finished_per_s"],
            "accepted_per_s": doc["accepted_per_s"], "finished": doc["finished"], "expected": doc["expected"],
            "cpu_ms_per_message": {k: round(1000 * v / max(1, doc["finished"]), 2) for k, v in cpu.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--partitions", default="1,2,4,8")
    p.add_argument("--replicas", default="1,2", help="deliver replicas to try at each partition count")
    a = p.parse_args()
    peer, port = start_smtp_sink()
    points = [(int(x), int(r)) for x, r in itertools.product(a.partitions.split(","), a.replicas.split(","))
              if int(r) <= int(x)]  # a replica without a partition would idle
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {pt: [] for pt in points}
    try:
        for rnd in range(a.rounds):
            for parts, reps in points:
                doc = one(a.count, parts, reps, port)
                runs[(parts, reps)].append(doc)
                print(f"round {rnd + 1}: {parts} partitions, {reps} deliver replica(s): "
                      f"{doc['delivered_per_s']}/s ({doc['finished']}/{doc['expected']})", flush=True)
    finally:
        peer.terminate()
    summary = []
    for (parts, reps), docs in runs.items():
        docs.sort(key=lambda d: d["delivered_per_s"])
        mid = docs[len(docs) // 2]
        summary.append({"partitions": parts, "deliver_replicas": reps,
                        "delivered_per_s": round(statistics.median(d["delivered_per_s"] for d in docs), 1),
                        "range": [docs[0]["delivered_per_s"], docs[-1]["delivered_per_s"]],
                        "cpu_ms_per_message": mid["cpu_ms_per_message"]})
    for row in summary:
        print(f"{row['partitions']} partitions x {row['deliver_replicas']} deliver: "
              f"{row['delivered_per_s']}/s (range {row['range']})")
    print(orjson.dumps({"count": a.count, "rounds": a.rounds, "points": summary}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
