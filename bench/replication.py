"""The cost of replication: the whole path on one broker against a three-node
cluster with replication 3, side by side.

Each round starts a private Kafka (one node, or a three-node cluster on loopback
with every topic replicated 3 times and ``min.insync.replicas=2``; never the
shared 9092), runs ``mailflow bench --start all --count N --remote-share 1.0`` against it (its
own stages, API and topic prefix; every message delivered over SMTP to Postfix's
``smtp-sink``, as bench/pipeline.py does), and stops it again, so an idle broker never adds
to the other's figures. Rounds alternate one broker and the cluster; medians are
reported: messages delivered per second, API p50, end-to-end p50/p99, CPU seconds
per message of the brokers (the JVMs of this round's Kafka, read from /proc) and
of the whole stack (mailflow's processes and those JVMs).

    .venv/bin/python bench/replication.py --count 3000 --rounds 3

Both sides get the same JVM heap (`--heap`, 512m, the cluster's default per node).
Scanning is off unless `--scanners` (then clamd and rspamd must run, as for
`mailflow bench`): it would add the same cost to both sides. Needs smtp-sink
(Debian: postfix) and the broker's jars. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("harness", ROOT / "tests" / "harness.py")
assert _spec and _spec.loader
harness = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("harness", harness)
_spec.loader.exec_module(harness)


def jvm_cpu(data_dir: Path) -> float:
    """CPU seconds used so far by the Kafka JVMs whose files are under `data_dir`."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"kafka.Kafka" not in cmd or str(data_dir).encode() not in cmd:
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return total


def one_round(kind: str, work: Path, count: int, heap: str, scanners: bool,
              sink_port: int) -> dict[str, Any]:
    data = work / f"{kind}-{time.time_ns()}"
    data.mkdir(parents=True)
    kafka: Any
    if kind == "cluster":
        kafka = harness.Cluster(data, 3, heap=heap)
    else:
        kafka = harness.Broker(data, harness.free_port(), harness.free_port(), heap=heap)
    kafka.start()
    try:
        time.sleep(5)  # past the start-up's own CPU burst
        env = {**os.environ, "MAILFLOW_KAFKA_BOOTSTRAP": kafka.bootstrap,
               "MAILFLOW_REPLICATION": "3" if kind == "cluster" else "1",
               "MAILFLOW_DATA_DIR": str(data / "stack"),
               "MAILFLOW_SMTP_ROUTES": f"*=127.0.0.1:{sink_port}",
               "MAILFLOW_SCANNERS": "clamd,rspamd" if scanners else "none"}
        proc = subprocess.Popen([sys.executable, "-m", "mailflow.ops.cli", "bench", "--start", "all",
                                 "--count", str(count), "--remote-share", "1.0"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT)
        # The brokers' CPU from when the bench's stack is up (its line on stderr) to its
        # end, like the bench's own per-process figures: not the topics' creation and
        # the groups' first joins.
        cpu0 = jvm_cpu(data)
        err_lines = []
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:
            err_lines.append(line)
            if line.startswith("bench: stack ") and " up " in line:
                cpu0 = jvm_cpu(data)
                break
        err_lines += proc.stderr.readlines()
        stdout = proc.stdout.read()
        proc.wait(1800)
        broker_cpu = jvm_cpu(data) - cpu0
        out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "".join(err_lines))
    finally:
        kafka.stop()
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{kind}: mailflow bench failed ({out.returncode}):\n"
                           f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    r = orjson.loads(lines[-1])
    # The bench's "broker" and "other" roles count every JVM and every mailflow
    # process on the machine (other stacks too); the stages', the API's and this
    # round's JVMs are exactly this stack.
    stack_cpu = sum(v for k, v in r["cpu_seconds"].items()
                    if k.startswith("stage ") or k == "api") + broker_cpu
    return {"kind": kind, "delivered_per_s": r["finished_per_s"], "states": r["states"], "accepted_per_s": r["accepted_per_s"],
            "api_p50_ms": r["api_p50_ms"], "latency_p50_ms": r["latency_p50_ms"],
            "latency_p99_ms": r["latency_p99_ms"],
            "broker_cpu_ms_per_msg": round(1000 * broker_cpu / r["finished"], 2),
            "stack_cpu_ms_per_msg": round(1000 * stack_cpu / r["finished"], 2),
            "finished": r["finished"], "expected": r["expected"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=3000, help="messages per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each kind, alternated")
    p.add_argument("--heap", default="512m", help="each Kafka JVM's -Xmx")
    p.add_argument("--scanners", action="store_true", help="scan with clamd and rspamd too")
    a = p.parse_args()
    from devtools.bench import start_smtp_sink

    results: list[dict[str, Any]] = []
    sink, sink_port = start_smtp_sink("-c")  # keeps nothing
    try:
        with tempfile.TemporaryDirectory(prefix="mailflow-replication-") as tmp:
            for i in range(a.rounds):
                for kind in (("single", "cluster") if i % 2 == 0 else ("cluster", "single")):
                    r = one_round(kind, Path(tmp), a.count, a.heap, a.scanners, sink_port)
                    print(orjson.dumps(r).decode(), file=sys.stderr, flush=True)
                    results.append(r)
    finally:
        sink.terminate()
    keys = ("delivered_per_s", "accepted_per_s", "api_p50_ms", "latency_p50_ms", "latency_p99_ms",
            "broker_cpu_ms_per_msg", "stack_cpu_ms_per_msg")
    summary = {kind: {k: statistics.median(r[k] for r in results if r["kind"] == kind) for k in keys}
               for kind in ("single", "cluster")}
    for kind, m in summary.items():
        print(f"{kind:8} " + "  ".join(f"{k} {v}" for k, v in m.items()))
    print(orjson.dumps({"count": a.count, "rounds": a.rounds, "median": summary, "runs": results}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
