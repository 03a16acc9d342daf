"""Throughput of the local scanners: rspamd /checkv2 and clamd INSTREAM.

Usage (services must be running, e.g. ``python -m devtools.services up``)::

    python bench/scanners.py                       # defaults: 3 runs x 3 s, 8 clients
    python bench/scanners.py --runs 5 --duration 5 --concurrency 1,8
    python bench/scanners.py --no-clamd --rspamd http://127.0.0.1:11333

Each figure is the median over ``--runs`` runs.  Requests carry a ~4 KB
RFC 5322 message and the ``From``/``Rcpt`` headers of an SMTP envelope
(rspamd) or go through clamd's INSTREAM command.  The last line of the output
is one JSON object with the figures, for scripts and CI to pick up.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import clamd  # python-clamd, the client the scan stage uses


def make_message(size: int = 4096) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice Sender <alice@example.test>"
    msg["To"] = "Bob Receiver <bob@example.org>"
    msg["Subject"] = "Quarterly figures for the northern region"
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain="example.test")
    line = (
        "Hello Bob, please find below the summary of the quarterly figures we "
        "discussed on the phone last week.\n"
    )
    head = len(msg.as_bytes()) + 200
    body = (line * (max(size - head, len(line)) // len(line) + 1))[: max(size - head, 1)]
    msg.set_content(body + "\nBest regards,\nAlice\n")
    return msg.as_bytes()


def run_parallel(
    worker: Callable[[], Callable[[], None]], concurrency: int, duration: float
) -> tuple[float, list[float]]:
    """Run ``concurrency`` threads, each calling the function ``worker()`` returns
    in a loop for ``duration`` seconds.  Returns (requests per second, latencies)."""
    stop = threading.Event()
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    start_barrier = threading.Barrier(concurrency + 1)

    def loop(i: int) -> None:
        try:
            call = worker()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            start_barrier.abort()
            return
        try:
            start_barrier.wait()
        except threading.BrokenBarrierError:
            return
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                call()
                lat[i].append(time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    try:
        start_barrier.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    stop.wait(duration)
    stop.set()
    for t in threads:
        t.join(30)
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"benchmark request failed: {errors[0]!r}") from errors[0]
    flat = [x for xs in lat for x in xs]
    return len(flat) / elapsed, flat


def rspamd_worker(url: str, message: bytes, keepalive: bool) -> Callable[[], Callable[[], None]]:
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 11333
    headers = {
        "From": "alice@example.test",
        "Rcpt": "bob@example.org",
        "Content-Type": "message/rfc822",
    }

    def make() -> Callable[[], None]:
        conn: list[http.client.HTTPConnection] = []

        def call() -> None:
            if not conn:
                conn.append(http.client.HTTPConnection(host, port, timeout=30))
            c = conn[0]
            c.request("POST", "/checkv2", body=message, headers=headers)
            r = c.getresponse()
            data = r.read()
            if r.status != 200:
                raise RuntimeError(f"rspamd HTTP {r.status}: {data[:200]!r}")
            if b'"action"' not in data:
                raise RuntimeError(f"rspamd reply without action: {data[:200]!r}")
            if not keepalive or r.will_close:
                c.close()
                conn.clear()

        return call

    return make


def clamd_worker(host: str, port: int, message: bytes) -> Callable[[], Callable[[], None]]:
    import io

    def make() -> Callable[[], None]:
        cd = clamd.ClamdNetworkSocket(host=host, port=port, timeout=30)

        def call() -> None:
            res = cd.instream(io.BytesIO(message))
            if res.get("stream", ("",))[0] != "OK":
                raise RuntimeError(f"clamd: {res!r}")

        return call

    return make


def median_runs(
    label: str, runs: int, fn: Callable[[], tuple[float, list[float]]]
) -> dict[str, float]:
    rates, p50s, p99s = [], [], []
    for i in range(runs):
        rate, lat = fn()
        lat.sort()
        p50 = lat[len(lat) // 2] * 1000 if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan")
        rates.append(rate)
        p50s.append(p50)
        p99s.append(p99)
        print(
            f"  {label} run {i + 1}: {rate:8.1f}/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  n={len(lat)}"
        )
    res = {
        "per_s": statistics.median(rates),
        "p50_ms": statistics.median(p50s),
        "p99_ms": statistics.median(p99s),
    }
    print(f"  {label} median: {res['per_s']:.1f}/s  p50 {res['p50_ms']:.2f} ms")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rspamd", default=os.environ.get("MAILFLOW_RSPAMD", "http://127.0.0.1:11333"))
    ap.add_argument(
        "--clamd", default=os.environ.get("MAILFLOW_CLAMD", "127.0.0.1:3310"), help="host:port"
    )
    ap.add_argument(
        "--concurrency", default="1,8", help="comma separated client counts (default 1,8)"
    )
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=4096, help="message size in bytes")
    ap.add_argument(
        "--no-keepalive", action="store_true", help="new HTTP connection per rspamd check"
    )
    ap.add_argument("--no-rspamd", action="store_true")
    ap.add_argument("--no-clamd", action="store_true")
    args = ap.parse_args(argv)

    message = make_message(args.size)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    out: dict[str, float | int | str] = {
        "message_bytes": len(message),
        "runs": args.runs,
        "duration_s": args.duration,
    }
    print(
        f"message: {len(message)} bytes; {args.runs} runs x {args.duration}s; concurrency {levels}"
    )

    if not args.no_rspamd:
        for n in levels:
            print(f"rspamd {args.rspamd}/checkv2, {n} client(s), keepalive={not args.no_keepalive}")
            w = rspamd_worker(args.rspamd, message, keepalive=not args.no_keepalive)
            r = median_runs("rspamd", args.runs, lambda w=w, n=n: run_parallel(w, n, args.duration))
            out[f"rspamd_c{n}_checks_per_s"] = round(r["per_s"], 1)
            out[f"rspamd_c{n}_p50_ms"] = round(r["p50_ms"], 2)
        out["rspamd_checks_per_s"] = out[f"rspamd_c{max(levels)}_checks_per_s"]

    if not args.no_clamd:
        host, _, port = args.clamd.rpartition(":")
        out["clamd_client"] = "clamd"
        for n in levels:
            print(f"clamd {host}:{port} INSTREAM, {n} client(s), client={out['clamd_client']}")
            w = clamd_worker(host or "127.0.0.1", int(port), message)
            r = median_runs("clamd", args.runs, lambda w=w, n=n: run_parallel(w, n, args.duration))
            out[f"clamd_c{n}_scans_per_s"] = round(r["per_s"], 1)
            out[f"clamd_c{n}_p50_ms"] = round(r["p50_ms"], 2)
        out["clamd_scans_per_s"] = out[f"clamd_c{max(levels)}_scans_per_s"]

    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
