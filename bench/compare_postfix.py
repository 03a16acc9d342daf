"""mailflow side by side with Postfix: the same messages to the same SMTP peer.

Each round runs every system once, alternating, so both see the same machine:

- ``postfix``: a private Postfix instance (config, queue and logs under a temp dir,
  smtpd on its own loopback port, no system mail touched) relaying everything to
  the peer; the messages are submitted over SMTP.
- ``mailflow``: ``mailflow bench --start all`` with scanning off, submitted over the
  HTTP API, delivered by the deliver stage to the peer.
- ``mailflow-scan``: the same with clamd and rspamd on.
- ``mailflow-flow`` (optional): scanning off with in-flow control tightened
  (``MAILFLOW_IN_FLOW_BACKLOG``, ``--flow-backlog``): the ingress holds a submission
  back (up to 1 s) while more than that many messages wait in the pipeline, as
  Postfix's ``in_flow_delay`` does, so the queue, and with it latency, stays short.
- ``mailflow-fsync`` (optional): scanning off with the broker fsyncing every append
  (``log.flush.interval.messages=1``, set cluster-wide for the run and reset after),
  Postfix's durability: it fsyncs each queue file before it answers 250.

The peer is Postfix's ``smtp-sink`` dumping each message to a file, so delivery
time and duplicates are read from what arrived, the same way for both systems:
latency is from the moment the client started submitting a message to the file's
mtime at the peer. The peer and the SMTP client are measured alone first (they
must not be the bottleneck). The script ends with one JSON line.

    .venv/bin/python bench/compare_postfix.py --count 20000 --rounds 3

Needs the broker (`mailflow broker`) and, for ``mailflow-scan``, clamd and rspamd
(`python -m devtools.services up`), like bench/pipeline.py; Postfix from Debian's
package (installed by `make test`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.bench import (  # noqa: E402
    free_port,
    message,
    pct,
    proc_stat,
    pss_bytes,
    start_smtp_sink,
    wait_port,
)

SUBJECT = re.compile(rb"\nSubject: bench (\d+)\r?\n")
SYSTEMS = ("postfix", "mailflow", "mailflow-scan", "mailflow-flow", "mailflow-fsync")


class Peer:
    """smtp-sink answering 250 to everything and dumping each message to a file."""

    def __init__(self, root: Path) -> None:
        self.dir = root / f"peer-{time.monotonic_ns()}"
        self.dir.mkdir(parents=True)
        self.dir.chmod(0o777)  # smtp-sink drops to `nobody` before it writes
        # -d: one file per message (the name gets a random suffix).
        self.proc, self.port = start_smtp_sink("-d", f"{self.dir}/m.")

    def received(self) -> dict[int, list[float]]:
        """n -> mtimes of the files holding message `n` (more than one: a duplicate)."""
        out: dict[int, list[float]] = {}
        for entry in os.scandir(self.dir):
            with open(entry.path, "rb") as f:
                m = SUBJECT.search(f.read(4096))
            if m:
                out.setdefault(int(m.group(1)), []).append(entry.stat().st_mtime)
        return out

    def count(self) -> int:
        return sum(1 for _ in os.scandir(self.dir))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


async def smtp_submit(port: int, count: int, concurrency: int, size: int, domains: int,
                      senders: int = 500) -> dict[str, Any]:
    """Submit `count` messages over `concurrency` persistent SMTP connections."""
    import aiosmtplib

    numbers = iter(range(count))
    submitted: dict[int, float] = {}
    refused: dict[str, int] = {}
    started = time.perf_counter()

    async def connection() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60, start_tls=False)
        await smtp.connect()
        try:
            for n in numbers:
                sender = f"sender{n % senders}@mailflow.test"
                rcpt = f"user{n}@d{n % domains}.bench.test"
                wall = time.time()
                try:
                    await smtp.sendmail(sender, [rcpt], message(n, sender, rcpt, size))
                    submitted[n] = wall
                except aiosmtplib.SMTPException as exc:
                    refused[type(exc).__name__] = refused.get(type(exc).__name__, 0) + 1
        finally:
            await smtp.quit()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return {"submitted": submitted, "elapsed": time.perf_counter() - started, "refused": refused}


def wait_received(peer: Peer, want: int, timeout: float, label: str) -> None:
    deadline = time.monotonic() + timeout
    last = 0.0
    while (have := peer.count()) < want:
        if time.monotonic() > deadline:
            print(f"{label}: only {have}/{want} at the peer after {timeout:.0f} s", file=sys.stderr)
            return
        if time.monotonic() - last > 5:
            print(f"{label}: {have}/{want} at the peer", file=sys.stderr, flush=True)
            last = time.monotonic()
        time.sleep(0.2)
    time.sleep(1)  # a duplicate would arrive after the last original


def figures(submitted: dict[int, float], elapsed: float, got: dict[int, list[float]]) -> dict[str, Any]:
    lat = [min(got[n]) - t for n, t in submitted.items() if n in got]
    arrivals = [t for ts in got.values() for t in ts]
    span = (max(arrivals) - min(submitted.values())) if arrivals and submitted else float("nan")
    return {
        "accepted": len(submitted),
        "accepted_per_s": round(len(submitted) / elapsed, 1),
        "delivered": len(got),
        "delivered_per_s": round(len(got) / span, 1) if arrivals else 0.0,
        "missing": sum(1 for n in submitted if n not in got),
        "duplicates": sum(len(ts) - 1 for ts in got.values()),
        "p50_ms": round(pct(lat, 0.50) * 1000, 1),
        "p95_ms": round(pct(lat, 0.95) * 1000, 1),
        "p99_ms": round(pct(lat, 0.99) * 1000, 1),
    }


class TreeSampler(threading.Thread):
    """CPU seconds and peak summed memory (PSS) of a process and all its descendants.

    CPU of children that exited and were reaped is in the parent's cutime/cstime,
    so short-lived Postfix daemons are counted too.
    """

    def __init__(self, root_pid: int) -> None:
        super().__init__(daemon=True)
        self.root = root_pid
        self.tick = os.sysconf("SC_CLK_TCK")
        self.running = True
        self.peak = 0
        self.first = self.cpu()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                ppid = int(proc_stat(int(pid))[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(pid))
        out, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    def cpu(self) -> float:
        total = 0.0
        for pid in self._tree():
            try:
                f = proc_stat(pid)
            except OSError:
                continue
            # utime, stime; the root also carries its reaped children's times.
            total += int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if pid == self.root else 0)
        return total / self.tick

    def rss(self) -> int:
        return sum(pss_bytes(pid) for pid in self._tree())

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.5)

    def stop(self) -> dict[str, float]:
        self.running = False
        return {"cpu_seconds": round(self.cpu() - self.first, 1), "peak_pss_mb": round(self.peak / 2**20, 1)}


class Postfix:
    """A private Postfix: its own config, queue and log under `root`, smtpd on `port`."""

    # chroot off (column 5) so nothing outside the temp dir is needed; only the
    # services a relay uses.
    MASTER = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

    def __init__(self, root: Path, relay_port: int, concurrency: int) -> None:
        self.root = root / f"postfix-{time.monotonic_ns()}"
        self.etc = self.root / "etc"
        self.etc.mkdir(parents=True)
        self.port = free_port()
        (self.etc / "master.cf").write_text(self.MASTER.format(port=self.port))
        (self.etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {self.root}/spool
data_directory = {self.root}/lib
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.bench.test
mydestination =
local_recipient_maps =
relayhost = [127.0.0.1]:{relay_port}
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file = {self.root}/maillog
maillog_file_prefixes = {self.root}
# Throughput settings, not stock: enough smtpd processes for the client's
# connections, and as many parallel deliveries to the one relay host as mailflow
# opens per destination.
default_process_limit = {max(100, concurrency * 2)}
smtp_destination_concurrency_limit = {concurrency}
relay_destination_concurrency_limit = {concurrency}
smtpd_client_connection_count_limit = 0
smtpd_client_message_rate_limit = 0
anvil_rate_time_unit = 60s
""")
        (self.root / "spool").mkdir()
        (self.root / "lib").mkdir()
        shutil.chown(self.root / "lib", "postfix")
        self._postfix("start")  # creates the queue's subdirectories with their owners
        wait_port(self.port)
        pid_file = self.root / "spool" / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.master_pid = int(pid_file.read_text().split()[0])

    def _postfix(self, command: str) -> None:
        out = subprocess.run(["postfix", "-c", str(self.etc), command], capture_output=True, text=True,
                             timeout=60)
        if out.returncode != 0:
            # Postfix logs to syslog (absent here) until its own log service runs.
            log = self.root / "maillog"
            tail = log.read_text()[-2000:] if log.exists() else "(no maillog; run it on a tty to see why)"
            raise RuntimeError(f"postfix {command} failed:\n{out.stdout}{out.stderr}{tail}")

    def stop(self) -> None:
        try:
            self._postfix("stop")
            deadline = time.monotonic() + 20
            while Path(f"/proc/{self.master_pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def run_postfix(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    peer = Peer(work)
    pf = None
    try:
        pf = Postfix(work, peer.port, args.concurrency)
        sampler = TreeSampler(pf.master_pid)
        sampler.start()
        sub = asyncio.run(smtp_submit(pf.port, args.count, args.concurrency, args.size, args.domains))
        print(f"postfix: {len(sub['submitted'])} accepted in {sub['elapsed']:.1f} s", file=sys.stderr)
        wait_received(peer, len(sub["submitted"]), args.timeout, "postfix")
        usage = sampler.stop()
        return {**figures(sub["submitted"], sub["elapsed"], peer.received()), **usage,
                "refused": sub["refused"]}
    finally:
        if pf is not None:
            pf.stop()
        peer.stop()


def set_broker_flush(bootstrap: str, value: str | None) -> None:
    """Dynamic per-broker config on every broker; None deletes the override."""
    from confluent_kafka.admin import (
        AdminClient,
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
        ResourceType,
    )

    admin = AdminClient({"bootstrap.servers": bootstrap})
    op = AlterConfigOpType.DELETE if value is None else AlterConfigOpType.SET
    resources = [ConfigResource(ResourceType.BROKER, str(broker_id), incremental_configs=[
        ConfigEntry("log.flush.interval.messages", value or "", incremental_operation=op)])
        for broker_id in admin.list_topics(timeout=10).brokers]
    for fut in admin.incremental_alter_configs(resources).values():
        fut.result()


def run_mailflow(args: argparse.Namespace, work: Path, system: str) -> dict[str, Any]:
    from mailflow.config import Settings

    peer = Peer(work)
    log = work / f"submit-{time.monotonic_ns()}.json"
    env = {**os.environ, "MAILFLOW_SMTP_ROUTES": f"*=127.0.0.1:{peer.port}",
           "MAILFLOW_SCANNERS": "clamd,rspamd" if system == "mailflow-scan" else "none"}
    if system == "mailflow-flow":
        env["MAILFLOW_IN_FLOW_BACKLOG"] = str(args.flow_backlog)
    cmd = [sys.executable, "-m", "mailflow.ops.cli", "bench", "--start", "all", "--count", str(args.count),
           "--size", str(args.size), "--concurrency", str(args.concurrency), "--domains", str(args.domains),
           "--remote-share", "1.0", "--submit-log", str(log), "--timeout", str(args.timeout)]
    bootstrap = Settings.from_env().kafka_bootstrap
    try:
        if system == "mailflow-fsync":
            set_broker_flush(bootstrap, "1")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout + 600, cwd=ROOT)
        lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
        if not lines or not log.exists():
            raise RuntimeError(f"{system} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        doc = orjson.loads(lines[-1])
        submitted = {int(n): t for n, t in orjson.loads(log.read_bytes()).items()}
        wait_received(peer, len(submitted), 30, system)
        got = peer.received()
        # The bench's own sampler: every stage, the API and the broker, without its client.
        cpu = sum(v for k, v in doc["cpu_seconds"].items() if k != "bench client")
        elapsed = len(submitted) / doc["accepted_per_s"] if doc["accepted_per_s"] else float("nan")
        return {**figures(submitted, elapsed, got), "cpu_seconds": round(cpu, 1),
                "peak_pss_mb": doc["peak_pss_mb"], "states": doc["states"], "refused": doc["refused"]}
    finally:
        if system == "mailflow-fsync":
            set_broker_flush(bootstrap, None)
        log.unlink(missing_ok=True)
        peer.stop()


def calibrate(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """The peer and the SMTP client alone: how fast they go with nothing in between."""
    peer = Peer(work)
    try:
        n = min(args.count, 10_000)
        sub = asyncio.run(smtp_submit(peer.port, n, args.concurrency, args.size, args.domains))
        wait_received(peer, len(sub["submitted"]), 120, "peer alone")
        return {"client_to_peer_per_s": round(len(sub["submitted"]) / sub["elapsed"], 1), "messages": n}
    finally:
        peer.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=20000, help="messages per system per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each running every system once")
    p.add_argument("--systems", default="postfix,mailflow,mailflow-scan",
                   help=f"comma list from {', '.join(SYSTEMS)}")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--domains", type=int, default=50)
    p.add_argument("--concurrency", type=int, default=64, help="client connections / requests in flight")
    p.add_argument("--flow-backlog", type=int, default=500,
                   help="mailflow-flow: MAILFLOW_IN_FLOW_BACKLOG for that system")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for delivery per run")
    args = p.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if bad := [s for s in systems if s not in SYSTEMS]:
        p.error(f"unknown system(s) {', '.join(bad)}")
    if not shutil.which("postfix") and not Path("/usr/sbin/postfix").exists():
        p.error("postfix is not installed (Debian package `postfix`; `make test` installs it)")
    os.environ["PATH"] += os.pathsep + "/usr/sbin"
    work = Path(tempfile.mkdtemp(prefix="mailflow-vs-postfix-"))
    work.chmod(0o755)
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    try:
        cal = calibrate(args, work)
        print(f"peer and client alone: {cal['client_to_peer_per_s']}/s over {cal['messages']} messages",
              flush=True)
        for rnd, system in itertools.product(range(args.rounds), systems):
            doc = run_postfix(args, work) if system == "postfix" else run_mailflow(args, work, system)
            results[system].append(doc)
            print(f"round {rnd + 1} {system:14} accepted/s {doc['accepted_per_s']:7.1f}  "
                  f"delivered/s {doc['delivered_per_s']:7.1f}  p50 {doc['p50_ms']:8.1f}  p95 {doc['p95_ms']:8.1f}  "
                  f"p99 {doc['p99_ms']:8.1f} ms  cpu {doc['cpu_seconds']:6.1f} s  pss {doc['peak_pss_mb']:6.1f} MB  "
                  f"missing {doc['missing']} dup {doc['duplicates']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys = ("accepted_per_s", "delivered_per_s", "p50_ms", "p95_ms", "p99_ms", "cpu_seconds", "peak_pss_mb")
    summary = {
        s: {**{k: statistics.median(d[k] for d in docs) for k in keys},
            **{f"{k}_range": [min(d[k] for d in docs), max(d[k] for d in docs)] for k in keys},
            "missing": sum(d["missing"] for d in docs), "duplicates": sum(d["duplicates"] for d in docs),
            "runs": len(docs)}
        for s, docs in results.items() if docs
    }
    ratios = {}
    if "postfix" in results:
        # Ratios per round (the two ran side by side), then the median of those.
        for s in (x for x in systems if x != "postfix"):
            ratios[f"{s}/postfix"] = {
                k: round(statistics.median(m[k] / pf[k] for m, pf in zip(results[s], results["postfix"],
                                                                           strict=True) if pf[k]), 2)
                for k in keys
            }
    for name, r in ratios.items():
        print(f"{name}: " + ", ".join(f"{k} x{v}" for k, v in r.items()))
    print(orjson.dumps({"count": args.count, "rounds": args.rounds, "calibration": cal,
                        "systems": summary, "ratios": ratios}).decode())
    return 0 if all(v["missing"] == 0 and v["duplicates"] == 0 for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
