"""The deliver stage's SMTP client alone: CPU per message, pipelined and not, side by side.

Usage::

    python bench/smtp_client.py                      # 3000 messages a round, 3 rounds
    python bench/smtp_client.py --count 5000 --concurrency 16 --rounds 5

It starts Postfix's ``smtp-sink`` on a free loopback port (it offers PIPELINING) and
sends ``--count`` messages of ``--size`` bytes through `mailflow.mta.smtp.Pool`,
``--concurrency`` at a time over pooled connections, twice a round in alternating
order: once as the stage does (pipelined, RFC 2920) and once with pipelining
turned off for the pool's connections (one command at a time, through aiosmtplib).
It prints, per round and mode, the CPU of this process per message and the
messages per second, then the medians, ending with one JSON line. The peer's own
CPU is not counted.

Needs ``smtp-sink`` (Debian's postfix package); it says so and exits 2 without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools.bench import message, start_smtp_sink  # noqa: E402
from mailflow.mta.smtp import Pool  # noqa: E402


class _NoPipelining(Pool):
    """The pool with PIPELINING hidden from every connection it opens."""

    async def _open(self, host: str, port: int) -> Any:
        smtp = await super()._open(host, port)
        smtp.esmtp_extensions.pop("pipelining", None)
        return smtp


async def one_round(pipelined: bool, port: int, count: int, concurrency: int, size: int) -> dict[str, float]:
    cls = Pool if pipelined else _NoPipelining
    pool = cls(ehlo="mailflow.test", timeout=10, tls="off", max_per_host=concurrency)
    sem = asyncio.Semaphore(concurrency)
    bodies = [message(i, "a@mailflow.test", f"u{i % 50}@bench.test", size) for i in range(count + 1)]

    async def send(i: int) -> None:
        async with sem:
            out = await pool.send("127.0.0.1", port, "a@mailflow.test", [f"u{i % 50}@bench.test"], bodies[i])
            if out[0].kind != "delivered":
                raise RuntimeError(f"not delivered: {out[0]}")

    try:
        await send(count)  # the first connection is not measured
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(send(i) for i in range(count)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await pool.close()
    return {"cpu_ms_per_msg": round(1000 * cpu / count, 4), "msgs_per_s": round(count / wall, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--size", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    if not (shutil.which("smtp-sink") or Path("/usr/sbin/smtp-sink").exists()):
        print("smtp_client: needs Postfix's smtp-sink (apt-get install postfix)", file=sys.stderr)
        return 2
    sink, port = start_smtp_sink()
    results: dict[str, list[dict[str, float]]] = {"pipelined": [], "unpipelined": []}
    try:
        for r in range(a.rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            for pipelined in order:
                name = "pipelined" if pipelined else "unpipelined"
                res = asyncio.run(one_round(pipelined, port, a.count, a.concurrency, a.size))
                results[name].append(res)
                print(f"round {r + 1} {name:11}: {res['cpu_ms_per_msg']:.3f} ms CPU/msg, "
                      f"{res['msgs_per_s']:.0f} msg/s", flush=True)
    finally:
        sink.terminate()
        sink.wait(10)
    summary = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in results.items()}
    ratio = summary["pipelined"]["cpu_ms_per_msg"] / summary["unpipelined"]["cpu_ms_per_msg"]
    print(f"median: pipelined {summary['pipelined']['cpu_ms_per_msg']:.3f} ms CPU/msg, one at a time "
          f"{summary['unpipelined']['cpu_ms_per_msg']:.3f} (ratio {ratio:.2f})")
    print(json.dumps({"rounds": a.rounds, "count": a.count, "concurrency": a.concurrency, "size": a.size,
                      **summary, "cpu_ratio": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
