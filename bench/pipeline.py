"""The whole path, HTTP submission to a message received by an SMTP peer.

Starts Postfix's `smtp-sink` as the peer (fast, so it is not the bottleneck), then
alternates `mailflow bench --start all` runs with scanning off and on (and the
submission half alone: local mailboxes), each on a fresh topic prefix on the
running broker, and prints the medians. Ends with one JSON line.

    .venv/bin/python bench/pipeline.py --count 5000 --runs 3
    .venv/bin/python bench/pipeline.py --count 5000 --runs 3 --modes healthy,tenpct451

Needs a broker on MAILFLOW_KAFKA_BOOTSTRAP (`mailflow broker`), and clamd and
rspamd (`python -m devtools.services up`) for the scanning runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

import orjson

from devtools.bench import free_port, start_smtp_sink

DEFERRING = [f"d{i}.bench.test" for i in range(5)]  # 5 of the bench's 50 domains: 10 % of the mail


def one(mode: str, count: int, sink_port: int, defer_port: int) -> dict:
    env = {**os.environ, "MAILFLOW_SMTP_ROUTES": f"*=127.0.0.1:{sink_port}"}
    args = [sys.executable, "-m", "mailflow.ops.cli", "bench", "--start", "all", "--count", str(count)]
    if mode in ("healthy", "tenpct451"):
        # The retry benchmark: scanning off; in `tenpct451` 10 % of the mail goes to a
        # server that always answers 451, and only the rest is waited for.
        env["MAILFLOW_SCANNERS"] = "none"
        args += ["--remote-share", "1.0", "--skip-domains", ",".join(DEFERRING)]
        if mode == "tenpct451":
            env["MAILFLOW_SMTP_ROUTES"] = ",".join(
                [f"{d}=127.0.0.1:{defer_port}" for d in DEFERRING] + [f"*=127.0.0.1:{sink_port}"])
    elif mode == "local":
        env["MAILFLOW_SCANNERS"] = "none"
    else:
        args += ["--remote-share", "1.0"]
        env["MAILFLOW_SCANNERS"] = "none" if mode == "scan-off" else "clamd,rspamd"
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    lines = [x for x in out.stdout.strip().splitlines() if x.startswith("{")]
    if not lines:
        raise RuntimeError(f"bench {mode} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    doc = orjson.loads(lines[-1])
    doc["mode"] = mode
    print(f"{mode:9} accepted/s {doc['accepted_per_s']:7.1f}  final/s {doc['finished_per_s']:7.1f}  "
          f"p50 {doc['latency_p50_ms']:8.1f} ms  p99 {doc['latency_p99_ms']:8.1f} ms  "
          f"states {doc['states']}", flush=True)
    return doc


class Always451:
    """An SMTP server that defers every recipient (a greylisting or broken domain)."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: ANN001
        return "451 4.7.1 try again later"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--modes", default="local,scan-off,scan-on")
    a = p.parse_args()
    peer, port = start_smtp_sink("-c")  # keeps nothing
    defer = Always451()
    defer.controller.start()
    results: dict[str, list[dict]] = {}
    try:
        for _ in range(a.runs):
            for mode in a.modes.split(","):
                results.setdefault(mode, []).append(one(mode, a.count, port, defer.port))
    finally:
        peer.terminate()
        defer.controller.stop()
    summary = {}
    for mode, docs in results.items():
        def med(key: str, docs: list[dict] = docs) -> float:
            return round(statistics.median(d[key] for d in docs), 1)

        summary[mode] = {
            "runs": len(docs), "accepted_per_s": med("accepted_per_s"), "final_per_s": med("finished_per_s"),
            "p50_ms": med("latency_p50_ms"), "p99_ms": med("latency_p99_ms"),
            "final_per_s_range": [min(d["finished_per_s"] for d in docs), max(d["finished_per_s"] for d in docs)],
            "peak_pss_mb": med("peak_pss_mb"),
            "cpu_seconds": {k: round(statistics.median(d["cpu_seconds"].get(k, 0) for d in docs), 1)
                            for k in docs[0]["cpu_seconds"]},
        }
    out: dict = {"count": a.count, "modes": summary}
    if "healthy" in summary and "tenpct451" in summary:
        pairs = zip(results["healthy"], results["tenpct451"], strict=False)
        out["tenpct451_vs_healthy"] = round(statistics.median(
            b["finished_per_s"] / h["finished_per_s"] for h, b in pairs if h["finished_per_s"]), 2)
    print(orjson.dumps(out).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
