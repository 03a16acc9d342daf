"""`mailflow bench`: load through the HTTP API and a report of what came out.

It submits `--count` messages of about `--size` bytes with `--concurrency` requests
in flight, then follows the ``events`` topic until every recipient of every
accepted message reached its final state (or what `--until` names), and reports
accepted/s, per-stage throughput, submission-to-state latency percentiles and the
peak memory of the stack's processes. With `--start` it first starts its own stack
(fresh topic prefix) on the running broker and stops it afterwards.

The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from mailflow.config import Settings
from schemas.records import event_dicts
from schemas.states import FINAL
from streams.topics import full_name

# Input records per message, where not one: a remote message's events are accepted,
# validated, scanned, sent_folder (twice: passed on, and the Sent copy stored) and
# delivered; a local one's fewer.
RECORDS_PER_MESSAGE = {"status": 6}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", type=int, default=20000, help="messages to submit")
    p.add_argument("--size", type=int, default=4096, help="approximate message size in bytes")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    p.add_argument("--senders", type=int, default=500, help="distinct sender addresses")
    p.add_argument("--domains", type=int, default=50, help="distinct remote recipient domains")
    p.add_argument("--remote-share", type=float, default=0.0,
                   help="share of messages to remote recipients (0: all local)")
    p.add_argument("--until", default="final", help="a state to wait for instead of a final one, e.g. validated")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the pipeline to drain")
    p.add_argument("--api", help="API base URL (default from settings)")
    p.add_argument("--key", default=os.environ.get("MAILFLOW_API_KEY"),
                   help="API key for the local domain (default $MAILFLOW_API_KEY; with --start one is made)")
    p.add_argument("--start", default="", help="start these stages (comma list or all) and an API first")
    p.add_argument("--api-workers", type=int, default=1, help="with --start: API processes")
    p.add_argument("--rate", type=float, default=0.0, help="messages per second to hold (0: as fast as accepted)")
    p.add_argument("--duration", default="", help="a soak run: hold --rate for this long (e.g. 10m); "
                   "sets --count and samples each stage's lag")
    p.add_argument("--lag-every", type=float, default=5.0, help="seconds between lag samples")
    p.add_argument("--submit-log", default="",
                   help="write {n: submission start, epoch seconds} of accepted messages to this JSON file "
                        "(bench/compare_postfix matches it with what the peer received)")
    p.add_argument("--keep", action="store_true",
                   help="with --start: keep the stack's topics and data dir afterwards "
                        "(by default they are deleted, so runs do not pile up on the broker)")
    p.add_argument("--form", choices=("raw", "json"), default="raw",
                   help="submit each message as message/rfc822 (raw) or as the JSON form the API composes")
    p.add_argument("--idempotency", action="store_true",
                   help="send each message with its own Idempotency-Key, as a careful client does")
    p.add_argument("--skip-domains", default="",
                   help="comma-separated recipient domains not to wait for (e.g. ones that always defer)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def start_smtp_sink(*options: str) -> tuple[subprocess.Popen[bytes], int]:
    """Postfix's smtp-sink as `nobody` on a free loopback port, once it listens:
    (process, port). It answers 250 to everything; `options` go before the address
    (``-c`` to count, ``-d TEMPLATE`` to keep each message in a file)."""
    port = free_port()
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    # 1000: listen backlog, so the peer never refuses a burst of connections.
    proc = subprocess.Popen([sink, "-u", "nobody", *options, f"127.0.0.1:{port}", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state first): utime and
    stime are [11] and [12], cutime and cstime [13] and [14], ppid [1]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def message(n: int, sender: str, rcpt: str, size: int) -> bytes:
    head = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: bench {n}\r\n"
            f"Message-ID: <bench{n}.{uuid.uuid4().hex}@bench.test>\r\n"
            f"Date: Fri, 27 Nov 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, and mail flows on. 0123456789\r\n"
    body = (line * (max(0, size - len(head)) // len(line) + 1))[: max(0, size - len(head))]
    return head + body


def json_message(n: int, sender: str, rcpt: str, size: int) -> bytes:
    """The JSON form of about the same message as `message`: the API composes it."""
    line = "The quick brown fox jumps over the lazy dog, and mail flows on. 0123456789\n"
    text = (line * (max(0, size - 300) // len(line) + 1))[: max(0, size - 300)]
    return orjson.dumps({"from": sender, "to": [rcpt], "subject": f"bench {n}", "text": text})


def assign_at_end(consumer: Any, topic: str) -> None:
    """Assign every partition of `topic` to `consumer` from its current end, and wait
    (up to 10 s) until those positions are known: an assignment at OFFSET_END
    resolves lazily, and a record produced before it resolved would be missed."""
    from confluent_kafka import OFFSET_END, TopicPartition

    md = consumer.list_topics(topic, timeout=10)
    consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in md.topics[topic].partitions])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        consumer.poll(0.1)
        if all(tp.offset >= 0 for tp in consumer.position(consumer.assignment())):
            break


class EventFollower(threading.Thread):
    """Reads ``events`` from the current end: accepted and final times per recipient."""

    def __init__(self, settings: Settings, until: str) -> None:
        super().__init__(daemon=True)
        from confluent_kafka import Consumer

        self.until = until
        self.consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                                  "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 50})
        assign_at_end(self.consumer, full_name(settings, "events"))
        self.accepted: dict[str, float] = {}
        self.done: dict[tuple[str, str], tuple[str, float]] = {}
        self.by_stage: dict[str, list[float]] = {}
        self.running = True
        self.lock = threading.Lock()

    def run(self) -> None:
        while self.running:
            for m in self.consumer.consume(1000, 0.2):
                value = m.value()
                if m.error() or value is None:
                    continue
                with self.lock:
                    for ev in event_dicts(value):
                        self.by_stage.setdefault(ev.get("stage", "?"), []).append(ev["ts"])
                        if ev["state"] == "accepted":
                            self.accepted[ev["id"]] = ev["ts"]
                        if ev["state"] in FINAL or ev["state"] == self.until:
                            for r in ev.get("recipients") or []:
                                self.done.setdefault((ev["id"], r), (ev["state"], ev["ts"]))

    def stop(self) -> None:
        self.running = False
        self.join(5)
        self.consumer.close()


def _role(cmd: bytes) -> str | None:
    """Which part of the stack a process is, from its command line."""
    if b"kafka.Kafka" in cmd:
        return "broker"
    if b"mailflow" not in cmd:
        return None
    args = cmd.split(b"\0")
    if b"worker" in args and b"--stages" in args:
        return "stage " + args[args.index(b"--stages") + 1].decode()
    for name in (b"api", b"sink", b"bench"):
        if name in args:
            return name.decode()
    return "other"


def pss_bytes(pid: int) -> int:
    """A process's proportional set size: shared pages split among their users, so a
    sum over many processes (Postfix's daemons, the stages) is not inflated by
    shared libraries the way a sum of RSS is. 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """Peak summed memory (PSS) of the stack's processes, and CPU seconds per role."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.running = True
        self.cpu_start: dict[int, tuple[str, float]] = {}
        self.cpu_last: dict[int, tuple[str, float]] = {}
        self.tick = os.sysconf("SC_CLK_TCK")

    def run(self) -> None:
        while self.running:
            total = 0
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    role = _role(Path(f"/proc/{pid}/cmdline").read_bytes())
                    if role is None:
                        continue
                    if int(pid) == os.getpid():
                        role = "bench client"
                    fields = proc_stat(int(pid))
                    cpu = (int(fields[11]) + int(fields[12])) / self.tick
                    self.cpu_start.setdefault(int(pid), (role, cpu))
                    self.cpu_last[int(pid)] = (role, cpu)
                    if role != "bench client":
                        total += pss_bytes(int(pid))
                except (OSError, ValueError, IndexError):
                    continue
            self.peak = max(self.peak, total)
            time.sleep(0.5)

    def cpu_by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, (role, cpu) in self.cpu_last.items():
            out[role] = round(out.get(role, 0.0) + cpu - self.cpu_start[pid][1], 2)
        return dict(sorted(out.items()))


class LagSampler(threading.Thread):
    """Lag per stage every few seconds, for the soak report (lag over time)."""

    def __init__(self, settings: Settings, every: float) -> None:
        super().__init__(daemon=True)
        self.settings, self.every = settings, every
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.running = True

    def run(self) -> None:
        from mailflow.ops.lag import measure

        while self.running:
            try:
                lags = measure(self.settings, timeout=5)
                self.samples.append((time.time(), {s.stage: s.total for s in lags}))
                worst = max(lags, key=lambda s: s.total)
                print(f"bench: lag {', '.join(f'{s.stage} {s.total}' for s in lags if s.total)}"
                      f" (largest: {worst.stage})", file=sys.stderr, flush=True)
            except Exception as exc:  # the report says how many samples it has
                print(f"bench: lag sample failed: {exc}", file=sys.stderr, flush=True)
            time.sleep(self.every)

    def report(self, submit_end: float, rate: float, path: Path) -> dict[str, Any]:
        """Max lag, lag when submission ended, and which stages fell behind.

        A stage fell behind when, at the end of submission, more than ten seconds of
        traffic waited on it, or its lag grew through the second half of the run.
        Lag counts records: one per message for most stages, several events per
        message for the status stage (`RECORDS_PER_MESSAGE`).
        """
        if not self.samples:
            return {"samples": 0}
        stages = sorted({k for _, d in self.samples for k in d})
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.write("ts," + ",".join(stages) + "\n")
            for ts, d in self.samples:
                f.write(f"{ts:.1f}," + ",".join(str(d.get(k, 0)) for k in stages) + "\n")
        during = [(t, d) for t, d in self.samples if t <= submit_end] or self.samples
        half = during[len(during) // 2:]
        at_end = during[-1][1]
        behind = []
        for k in stages:
            per_s = rate * RECORDS_PER_MESSAGE.get(k, 1)
            grew = len(half) >= 3 and half[-1][1].get(k, 0) > 2 * max(1, half[0][1].get(k, 0))
            if at_end.get(k, 0) > max(100, per_s * 10) or (grew and at_end.get(k, 0) > per_s):
                behind.append(k)
        return {"samples": len(self.samples), "csv": str(path),
                "max": {k: max(d.get(k, 0) for _, d in self.samples) for k in stages},
                "at_end_of_submission": {k: at_end.get(k, 0) for k in stages},
                "fell_behind": behind}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def submit_all(api: str, args: argparse.Namespace, local_domain: str) -> dict[str, Any]:
    sem = asyncio.Semaphore(args.concurrency)
    accepted: dict[str, list[str]] = {}
    refused: dict[str, int] = {}  # "status code" -> count (JSON keys are strings)
    latencies: list[float] = []
    submitted: dict[int, float] = {}  # n -> epoch time the request started, if accepted
    started = time.perf_counter()
    run_tag = uuid.uuid4().hex[:12]
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    headers = {"Content-Type": "application/json" if args.form == "json" else "message/rfc822"}
    build = json_message if args.form == "json" else message
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
        async def one(n: int) -> None:
            sender = f"sender{n % args.senders}@{local_domain}"
            if args.remote_share and (n % 1000) < args.remote_share * 1000:
                rcpt = f"user{n}@d{n % args.domains}.bench.test"
            else:
                rcpt = f"box{n % 1000}@{local_domain}"
            body = build(n, sender, rcpt, args.size)
            async with sem:
                if args.rate:
                    await asyncio.sleep(max(0.0, started + n / args.rate - time.perf_counter()))
                t0, wall = time.perf_counter(), time.time()
                extra = {"Idempotency-Key": f"bench-{run_tag}-{n}"} if args.idempotency else None
                async with http.post(f"{api}/v1/messages", data=body, headers=extra) as resp:
                    doc = await resp.read()
                latencies.append(time.perf_counter() - t0)
                if resp.status == 202:
                    accepted[orjson.loads(doc)["id"]] = [rcpt]
                    submitted[n] = wall
                else:
                    code = str(resp.status)
                    if code not in refused:  # say why, once per status
                        print(f"bench: {code}: {doc[:300]!r}", file=sys.stderr, flush=True)
                    refused[code] = refused.get(code, 0) + 1

        async def progress() -> None:
            while True:
                await asyncio.sleep(2)
                el = time.perf_counter() - started
                print(f"bench: {len(accepted)} accepted in {el:.0f}s ({len(accepted) / el:.0f}/s)",
                      file=sys.stderr, flush=True)

        ticker = asyncio.create_task(progress())
        await asyncio.gather(*(one(n) for n in range(args.count)))
        ticker.cancel()
    elapsed = time.perf_counter() - started
    return {"accepted": accepted, "refused": refused, "elapsed": elapsed, "latencies": latencies,
            "submitted": submitted}


SETTLE_TIMEOUT = 30.0


def settle(settings: Settings, start: str, timeout: float = SETTLE_TIMEOUT) -> dict[str, Any]:
    """Wait until every stage `--start` started has committed all of its input (lag 0).

    The last final state is not the end of the run's work: the status and webhooks
    stages read the same events after the mail is done, and a stage that is behind
    would finish after the CPU figures were read, so it would look cheaper than it
    is. The figures are read once every stage is done, or after `timeout`; the
    result says which it was.
    """
    from mailflow.ops.lag import measure
    from mailflow.ops.worker import available, parse_stages

    stages = sorted(s for s in parse_stages(start) if available(s))
    began = time.monotonic()
    left: dict[str, int] = {}
    while time.monotonic() - began < timeout:
        try:
            left = {s.stage: s.total for s in measure(settings, stages, timeout=5) if s.total}
        except Exception as exc:  # the figures are still worth reading; say so
            print(f"bench: lag not readable ({exc!r})", file=sys.stderr, flush=True)
            left = {"?": -1}
        if not left:
            break
        time.sleep(0.25)
    return {"settle_seconds": round(time.monotonic() - began, 2), "lag_left": left}


def run(settings: Settings, args: argparse.Namespace) -> int:
    sup = None
    settled: dict[str, Any] = {}
    if args.duration:
        from mailflow.config import parse_duration

        if not args.rate:
            print("mailflow bench: --duration needs --rate (messages per second to hold)", file=sys.stderr)
            return 2
        args.count = int(args.rate * parse_duration(args.duration))
    # Reports go under the data dir the bench was started with: a --start stack's own
    # data dir is deleted when the run ends.
    reports = settings.data_dir / "bench"
    if args.start:
        settings, sup, api = start_stack(settings, args)
    else:
        api = (args.api or f"http://{settings.api_host}:{settings.api_port}").rstrip("/")
    local_domain = sorted(settings.local_domains)[0]
    follower = EventFollower(settings, args.until)
    follower.start()
    mem = MemorySampler()
    mem.start()
    sampler = LagSampler(settings, args.lag_every) if args.duration else None
    if sampler:
        sampler.start()
    try:
        sub = asyncio.run(submit_all(api, args, local_domain))
        submit_end = time.time()
        if args.submit_log:
            Path(args.submit_log).write_bytes(orjson.dumps({str(n): t for n, t in sub["submitted"].items()}))
        accepted = sub["accepted"]
        skip = {d.strip() for d in args.skip_domains.split(",") if d.strip()}
        want = {(i, r) for i, rs in accepted.items() for r in rs if r.rpartition("@")[2] not in skip}
        print(f"bench: {len(accepted)} accepted in {sub['elapsed']:.1f}s; waiting for them to finish",
              file=sys.stderr, flush=True)
        deadline = time.monotonic() + args.timeout
        last = time.monotonic()
        while time.monotonic() < deadline:
            with follower.lock:
                n = sum(1 for k in want if k in follower.done)
            if n >= len(want):
                break
            if time.monotonic() - last > 2:
                print(f"bench: {n}/{len(want)} recipients done", file=sys.stderr, flush=True)
                last = time.monotonic()
            time.sleep(0.2)
        if sup is not None:
            settled = settle(settings, args.start)
    finally:
        follower.stop()
        mem.running = False
        if sampler:
            sampler.running = False
        if sup is not None:
            sup.stop()
            if not args.keep:
                remove_stack(settings)
    with follower.lock:
        done = {k: v for k, v in follower.done.items() if k in want}
        acc = follower.accepted
        lat = [ts - acc[i] for (i, _), (_, ts) in done.items() if i in acc]
        states: dict[str, int] = {}
        for st, _ in done.values():
            states[st] = states.get(st, 0) + 1
        first_done = min((ts for _, ts in done.values()), default=0)
        last_done = max((ts for _, ts in done.values()), default=0)
        first_acc = min((acc[i] for i in accepted if i in acc), default=0)
        stage_rates = {
            stage: round(len(ts) / max(1e-3, max(ts) - min(ts)), 1)
            for stage, ts in follower.by_stage.items() if len(ts) > 10
        }
    total_time = (last_done - first_acc) if done else float("nan")
    result = {
        "count": args.count, "size": args.size, "concurrency": args.concurrency,
        "accepted": len(accepted), "refused": sub["refused"],
        "accepted_per_s": round(len(accepted) / sub["elapsed"], 1),
        "api_p50_ms": round(pct(sub["latencies"], 0.5) * 1000, 2),
        "api_p99_ms": round(pct(sub["latencies"], 0.99) * 1000, 2),
        "finished": len(done), "expected": len(want), "states": states,
        "finished_per_s": round(len(done) / total_time, 1) if done else 0,
        "seconds_to_last": round(total_time, 2),
        "latency_p50_ms": round(pct(lat, 0.5) * 1000, 1),
        "latency_p99_ms": round(pct(lat, 0.99) * 1000, 1),
        "events_per_s_by_stage": stage_rates,
        "peak_pss_mb": round(mem.peak / 2**20, 1),
        "cpu_seconds": mem.cpu_by_role(),
        "drain_seconds_after_submit": round(last_done - first_done, 2) if done else None,
        **settled,
    }
    if sampler:
        csv = reports / f"lag-{settings.topic_prefix}{int(time.time())}.csv"
        result["lag"] = sampler.report(submit_end, args.rate, csv)
        print(f"lag over time in {csv}; max per stage {result['lag'].get('max')}; "
              f"fell behind: {', '.join(result['lag'].get('fell_behind') or []) or 'none'}")
    print(f"accepted {result['accepted']}/{args.count} at {result['accepted_per_s']}/s; "
          f"{result['finished']}/{result['expected']} recipients final at {result['finished_per_s']}/s; "
          f"p50 {result['latency_p50_ms']} ms, p99 {result['latency_p99_ms']} ms; "
          f"peak memory (PSS) {result['peak_pss_mb']} MB")
    print(orjson.dumps(result).decode())
    return 0 if len(done) == len(want) else 1


def remove_stack(settings: Settings) -> None:
    """Delete a --start stack's topics and data dir (kept with --keep)."""
    from streams.topics import delete_prefix_topics

    try:
        names = delete_prefix_topics(settings)
    except Exception as exc:  # the figures are in; say what is left behind
        print(f"bench: could not delete the stack's topics ({exc!r}); "
              f"they start with {settings.topic_prefix}", file=sys.stderr, flush=True)
        return
    shutil.rmtree(settings.data_dir, ignore_errors=True)
    print(f"bench: removed {len(names)} topics of {settings.topic_prefix} and {settings.data_dir}",
          file=sys.stderr, flush=True)


def start_stack(settings: Settings, args: argparse.Namespace) -> tuple[Settings, Any, str]:
    """Own topic prefix and data dir, stages and API as child processes."""
    import socket

    from devtools.stack import _http_ok
    from mailflow.ops.supervise import Supervisor
    from mailflow.ops.worker import available, parse_stages
    from streams.topics import ensure_topics

    prefix = f"bench{uuid.uuid4().hex[:6]}."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = settings.data_dir / "bench" / prefix.rstrip(".")
    env = {"MAILFLOW_TOPIC_PREFIX": prefix, "MAILFLOW_API_PORT": str(port),
           "MAILFLOW_DATA_DIR": str(data), "MAILFLOW_RATE_LIMIT": "1000000/60s"}
    os.environ.update(env)
    settings = Settings.from_env()
    ensure_topics(settings)
    from mailflow.api.auth import create_key

    args.key, _ = create_key(settings, sorted(settings.local_domains), name="bench")
    sup = Supervisor()
    me = [sys.executable, "-m", "mailflow.ops.cli"]
    for stage in parse_stages(args.start):
        if available(stage):
            sup.add(f"stage {stage}", [*me, "worker", "--stages", stage], env=env)
    api = f"http://127.0.0.1:{port}"
    for i in range(args.api_workers):
        sup.add(f"api {i}", [*me, "api", "--reuse-port"], env=env,
                ready=lambda: _http_ok(f"{api}/healthz"))
    sup.start()
    # Stages are ready once their consumers joined: wait for registry heartbeats.
    from mailflow.kafka_io import CompactedReader

    reader = CompactedReader(settings.kafka_bootstrap, [full_name(settings, "registry")])
    want = {s for s in parse_stages(args.start) if available(s)}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        have = {v.get("stage") for v in reader.values[full_name(settings, "registry")].values()}
        if want <= have:
            break
        time.sleep(0.5)
    reader.close()
    time.sleep(3)  # let the last rebalance settle
    print(f"bench: stack {prefix} up (stages {', '.join(sorted(want))})", file=sys.stderr, flush=True)
    return settings, sup, api
