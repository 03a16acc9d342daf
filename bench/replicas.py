"""Delivery with one replica against two, side by side in one run.

A slow SMTP peer (aiosmtpd on loopback, `--delay` seconds per message, 50 ms by
default) makes delivery the bottleneck. For each replica count, a fresh topic
prefix gets `--count` records on ``delivery`` while no delivery worker runs; then
the replicas start and the time from the first to the last message received by
the peer gives delivered/s. Rounds alternate 1 and 2 replicas; medians reported.

    .venv/bin/python bench/replicas.py --count 1500 --rounds 3

Needs a broker on MAILFLOW_KAFKA_BOOTSTRAP. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import orjson
from aiosmtpd.controller import Controller
from confluent_kafka import Producer

from mailflow.config import Settings
from mailflow.kafka_io import producer_config
from schemas.records import Message
from streams.topics import ensure_topics


class SlowPeer:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.times: list[float] = []
        self.lock = threading.Lock()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001
        await asyncio.sleep(self.delay)
        with self.lock:
            self.times.append(time.time())
        return "250 2.0.0 ok"


def one_round(replicas: int, count: int, peer: SlowPeer, base: Path) -> dict:
    prefix = f"rep{uuid.uuid4().hex[:6]}."
    env = {**os.environ, "MAILFLOW_TOPIC_PREFIX": prefix, "MAILFLOW_DATA_DIR": str(base / prefix),
           "MAILFLOW_SMTP_ROUTES": f"*=127.0.0.1:{peer.port}", "MAILFLOW_PARTITIONS": "8"}
    old = dict(os.environ)
    os.environ.update(env)
    settings = Settings.from_env()
    os.environ.clear()
    os.environ.update(old)
    ensure_topics(settings)
    p = Producer(producer_config(settings.kafka_bootstrap, **{"linger.ms": 20}))
    for n in range(count):
        dom = f"d{n % 64}.replicas.test"
        raw = (f"From: r@bench.test\r\nTo: u{n}@{dom}\r\nMessage-ID: <rep{n}@bench.test>\r\n"
               f"Subject: replicas {n}\r\n\r\n" + ("x" * 74 + "\r\n") * 50).encode()
        m = Message(id=f"{prefix}{n}", sender="r@bench.test", recipients=[f"u{n}@{dom}"],
                    received_at=time.time(), size=len(raw), body=raw, meta={"domain": dom})
        p.produce(f"{prefix}delivery", key=dom.encode(), value=m.to_json())
    p.flush(60)
    with peer.lock:
        peer.times.clear()
    procs = [subprocess.Popen([sys.executable, "-m", "mailflow.ops.cli", "worker", "--stages", "deliver"],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(base / f"{prefix}deliver.log", "ab"),
                              start_new_session=True) for _ in range(replicas)]
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with peer.lock:
                if len(peer.times) >= count:
                    break
            time.sleep(0.2)
        with peer.lock:
            times = sorted(peer.times)
    finally:
        for pr in procs:
            os.killpg(pr.pid, signal.SIGTERM)
        for pr in procs:
            try:
                pr.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(pr.pid, signal.SIGKILL)
    # Skip the start-up ramp (joining the group, first connections): rate over the
    # middle 80% of deliveries.
    lo, hi = times[len(times) // 10], times[len(times) * 9 // 10]
    rate = (len(times) * 0.8) / max(1e-3, hi - lo)
    print(f"{replicas} replica(s): {len(times)}/{count} delivered, {rate:.0f}/s", flush=True)
    return {"replicas": replicas, "delivered": len(times), "per_s": round(rate, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--delay", type=float, default=0.05)
    a = ap.parse_args()
    peer = SlowPeer(a.delay)
    peer.controller.start()
    base = Path(os.environ.get("MAILFLOW_DATA_DIR", "var")) / "bench-replicas"
    results: dict[int, list[float]] = {1: [], 2: []}
    try:
        for _ in range(a.rounds):
            for n in (1, 2):
                results[n].append(one_round(n, a.count, peer, base)["per_s"])
    finally:
        peer.controller.stop()
    one, two = statistics.median(results[1]), statistics.median(results[2])
    ratios = [b / x for x, b in zip(results[1], results[2], strict=True)]
    print(orjson.dumps({"count": a.count, "delay_s": a.delay, "one_replica_per_s": one,
                        "two_replicas_per_s": two, "ratio_median": round(statistics.median(ratios), 2),
                        "rounds": {str(k): v for k, v in results.items()}}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
