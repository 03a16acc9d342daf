"""Chaos run: steady mail while stage replicas, the broker, the SMTP peer and clamd fail.

Everything is real and private to the run: its own Kafka broker (so restarting it
disturbs nothing else), its own clamd, every stage as its own process (deliver with
two replicas), the API, and an aiosmtpd peer. While messages are submitted at a
steady rate:

- every `--kill-every` seconds a random stage replica gets SIGKILL and is restarted;
- the broker is restarted once (SIGKILL, so it recovers its log like after a crash);
  with ``--brokers 3`` the run has a three-node cluster instead, every topic
  replicated 3 times with ``min.insync.replicas=2``, and every `--broker-kill-every`
  seconds the node that leads the most of the run's partitions gets SIGKILL and is
  started again `--broker-down` seconds later;
- the SMTP peer stops listening for `--peer-down` seconds (mail defers, then drains);
- clamd is stopped for `--clamd-down` seconds (the scanner waits: SCAN_FAILURE=closed).

Then it waits for the pipeline to drain and checks, from the ``events`` topic, the
peer and the mailboxes: every accepted recipient in exactly one final state, every
delivered message at the peer exactly once (by Message-ID), nothing there that was
not accepted, each local mailbox holding exactly its messages. The one duplicate
SMTP itself allows is counted apart, not excused silently: a copy that reached the
peer before a deliver replica was killed -9 and whose outcome, for each recipient
it was sent to again, never reached the delivery ledger (see `unrecorded_before_kill`
and agents/deliver.py). A drain that finishes nothing for a minute leaves every
replica's ``/debug/consumer`` next to its log (`dump_consumers`). It prints the counts
and the longest delay any message saw, ends with one JSON line, and exits 1 if a
check failed. It also reports what the clients saw of the faults: submissions
refused (503) or delayed (answered more than `DELAYED` seconds after they were first
sent), the longest gap between two acceptances, and the longest stall of each
stage (its committed offset not moving while it had records to read); and on a
cluster, whether every topic of the run had replication 3 and min.insync.replicas
2, and whether every partition was back in sync at the end.

    .venv/bin/python bench/chaos.py --duration 5m --rate 200
    .venv/bin/python bench/chaos.py --brokers 3 --duration 5m --rate 50 --broker-kill-every 60s

Needs rspamd and the loopback DNS server: reused if they answer on their default
ports, else started for the run (`python -m devtools.services up` starts them for
good), and the broker's jars (`make test` or `mailflow broker` fetched them once).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The test harness drives real processes over real sockets; the chaos run is the
# same machinery under a schedule of faults.
_spec = importlib.util.spec_from_file_location("harness", ROOT / "tests" / "harness.py")
assert _spec and _spec.loader
harness = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("harness", harness)
_spec.loader.exec_module(harness)

from devtools.services import (  # noqa: E402
    DEFAULT_DATA_DIR,
    DEFAULT_DNS_CONF,
    ServiceGroup,
    dns_ping,
    prepare_clamd,
    prepare_dnsmasq,
    prepare_rspamd,
    rspamd_ping,
)
from mailflow.config import parse_duration  # noqa: E402
from schemas.records import event_dicts  # noqa: E402

FINAL = harness.FINAL
STAGES = ["ratelimit", "validate", "store", "scan", "sentfolder", "deliver", "deliver", "retry", "status"]
LOCAL_BOXES = [f"box{i}@mailflow.test" for i in range(10)]


# The peer notes a copy when it has read the final dot, which can be just after the
# sender dies: the data is in the socket's buffers when the kill comes (such copies
# arrive 8-14 ms after the kill at 200/s; PEER_LAG is a wide margin over that).
PEER_LAG = 2.0


def unrecorded_before_kill(copies: list[tuple[float, list[str]]], deliver_kills: list[float],
                           ledger: list[tuple[str, float]], peer_lag: float = PEER_LAG) -> bool:
    """Whether every copy but the last is the one duplicate SMTP's at-least-once
    leaves: a deliver replica was killed -9 around the copy (at most `peer_lag`
    before the peer noted it, or after) and before the next copy, and the outcome of
    each recipient the next copy went to again never reached the delivery ledger's
    changelog (no entry for that recipient written between the two copies), so the
    record was rightly handled again for them. A copy to a recipient whose ledger
    entry did reach the broker, or with no deliver kill around it, is a fault.

    `copies` are (when the peer noted it, its envelope recipients); `ledger` the
    message's entries as (recipient, ts). The ledger is per recipient: of two
    recipients of one transaction, one entry can reach the broker before the kill
    and the other not (each is its own record, and may be its own produce request).
    The ledger's `ts` is taken after the peer's 250 and the peer notes a copy
    before it answers, so an entry written for a copy is never older than it.
    """
    ordered = sorted(copies)
    for (t, _), (nxt, again) in zip(ordered, ordered[1:], strict=False):
        if not any(t - peer_lag <= k <= nxt for k in deliver_kills):
            return False
        resent = {r.lower() for r in again}
        if any(t <= ts < nxt and r.lower() in resent for r, ts in ledger):
            return False
    return True


def ledger_entries(stack: Any) -> dict[str, list[tuple[str, float]]]:
    """Message id -> (recipient, when it was written) of each delivery ledger entry
    for it, from the deliver stage's changelog topic (a compacted topic; its active
    segment, all a run writes, is never compacted)."""
    out: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for key, value in stack.read_topic("deliver-ledger-changelog", timeout=5):
        if key is None or value is None:
            continue
        mid, _, rcpt = orjson.loads(key).partition("|")
        out[mid].append((rcpt, float(orjson.loads(value)["ts"])))
    return out


def say(msg: str) -> None:
    print(f"chaos {time.strftime('%H:%M:%S')}: {msg}", file=sys.stderr, flush=True)


class Clamd:
    """A private clamd that can be stopped and started again on the same port."""

    def __init__(self, base: Path) -> None:
        self.base, self.port = base, harness.free_port()
        self.group: ServiceGroup | None = None

    def start(self) -> None:
        self.group = ServiceGroup([prepare_clamd(self.base, port=self.port)], log=lambda _m: None)
        self.group.start()

    def stop(self) -> None:
        if self.group:
            self.group.stop()
            self.group = None


def _reason(body: bytes) -> str:
    """The message of an API error answer, without what varies per request."""
    try:
        msg = str(orjson.loads(body)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "unparsed"
    return msg.split(" (")[0]


class Load(threading.Thread):
    """Submits JSON messages at a steady rate; remembers what was accepted.

    Like a careful client: each message has its own Idempotency-Key, and a 503 or a
    broken connection (the broker or the API restarting) is retried with the same
    key, backing off, for up to `patience` seconds, so a message Kafka took but whose answer was
    lost is neither lost to the check nor sent twice. A message still unanswered
    then is asked about again with its key once the load is over (`settle`): past
    what the machine takes, the API's answers come late, and a message the client
    gave up on may well have been accepted (a 200/s run on 2 cores: 4,014 at the
    peer that the client had given up on).
    """

    patience = 120.0

    def __init__(self, api: str, key: str, rate: float, seconds: float) -> None:
        super().__init__(daemon=True)
        self.api, self.key, self.rate, self.seconds = api, key, rate, seconds
        self.accepted: dict[str, list[str]] = {}  # message id -> recipients
        self.refused: Counter[str] = Counter()  # given up on, by last answer
        self.retried: Counter[str] = Counter()  # answers that were tried again
        self.unanswered: dict[int, tuple[dict[str, Any], str]] = {}  # n -> (document, key)
        self.settled = 0  # of those, answered once the load was over
        self.run_tag = f"{time.time_ns():x}"
        # What the client saw, on the monotonic clock: when each 202 came, how long
        # after its first attempt, and when each 5xx or broken connection came.
        self.accepted_at: list[float] = []
        self.waited: list[tuple[float, float]] = []  # (first attempt, seconds until 202)
        self.failed_at: list[tuple[float, str]] = []
        self.why_503: Counter[str] = Counter()  # the API's message, per 503

    def run(self) -> None:
        asyncio.run(self._run())

    def settle(self, within: float = 1800.0) -> None:
        """Ask again about each message the load gave up on, with its key, until it
        is answered or `within` seconds have passed; those never answered count as
        refused (``unanswered``)."""
        if self.unanswered:
            asyncio.run(self._settle(within))

    async def _post(self, http: Any, doc: dict[str, Any], key: str) -> tuple[str, bytes]:
        """One attempt: (answer, body); the answer is the status or the error's name."""
        import aiohttp

        try:
            async with http.post(f"{self.api}/v1/messages", json=doc,
                                 headers={"Idempotency-Key": key}) as resp:
                return str(resp.status), await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__, b""

    def _session(self) -> Any:
        import aiohttp

        return aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.key}"},
                                     timeout=aiohttp.ClientTimeout(total=30))

    async def _run(self) -> None:
        total = int(self.rate * self.seconds)
        start = time.monotonic()
        async with self._session() as http:
            async def one(n: int) -> None:
                # One in five local (straight to a mailbox), the rest to ten remote domains,
                # some with two recipients at one domain.
                if n % 5 == 0:
                    to = [LOCAL_BOXES[n % len(LOCAL_BOXES)]]
                elif n % 7 == 0:
                    to = [f"a{n}@d{n % 10}.chaos.test", f"b{n}@d{n % 10}.chaos.test"]
                else:
                    to = [f"u{n}@d{n % 10}.chaos.test"]
                doc = {"from": f"s{n % 50}@mailflow.test", "to": to, "subject": f"chaos {n}",
                       "text": "x" * 1500}
                key = f"chaos-{self.run_tag}-{n}"
                first = time.monotonic()
                give_up = first + self.patience
                backoff = 1.0  # doubling to 16 s: a client that waits longer the longer it fails
                while True:
                    answer, body = await self._post(http, doc, key)
                    if answer == "202":
                        self.accepted[orjson.loads(body)["id"]] = to
                        now = time.monotonic()
                        self.accepted_at.append(now)
                        self.waited.append((first, now - first))
                        return
                    if not (answer.isdigit() and int(answer) < 500):
                        self.failed_at.append((time.monotonic(), answer))
                        if answer == "503":
                            self.why_503[_reason(body)] += 1
                    if answer.isdigit() and int(answer) < 500:
                        self.refused[answer] += 1
                        return
                    if time.monotonic() > give_up:
                        self.unanswered[n] = (doc, key)
                        return
                    self.retried[answer] += 1
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 16.0)

            tasks = []
            for n in range(total):
                await asyncio.sleep(max(0.0, start + n / self.rate - time.monotonic()))
                tasks.append(asyncio.create_task(one(n)))
            await asyncio.gather(*tasks)

    async def _settle(self, within: float) -> None:
        deadline = time.monotonic() + within
        gate = asyncio.Semaphore(64)
        async with self._session() as http:
            async def one(n: int, doc: dict[str, Any], key: str) -> None:
                async with gate:
                    while time.monotonic() < deadline:
                        answer, body = await self._post(http, doc, key)
                        if answer == "202":
                            self.accepted[orjson.loads(body)["id"]] = doc["to"]
                        elif answer.isdigit() and int(answer) < 500:
                            self.refused[answer] += 1
                        else:
                            await asyncio.sleep(1.0)
                            continue
                        del self.unanswered[n]
                        self.settled += 1
                        return

            await asyncio.gather(*(one(n, d, k) for n, (d, k) in list(self.unanswered.items())))
        if self.unanswered:
            self.refused["unanswered"] += len(self.unanswered)


def final_states(stack: Any) -> tuple[dict[tuple[str, str], set[str]], dict[str, float], dict[str, float]]:
    """(id, recipient) -> final states seen; id -> accepted time; id -> last final time."""
    states: dict[tuple[str, str], set[str]] = defaultdict(set)
    accepted: dict[str, float] = {}
    last: dict[str, float] = {}
    recipients: dict[str, list[str]] = {}
    for _, value in stack.read_topic("events", timeout=5):
        for ev in event_dicts(value):
            if ev["state"] == "accepted":
                accepted.setdefault(ev["id"], ev["ts"])
                recipients[ev["id"]] = ev.get("recipients") or []
            if ev["state"] in FINAL:
                for r in ev.get("recipients") or recipients.get(ev["id"], []):
                    states[(ev["id"], r)].add(ev["state"])
                last[ev["id"]] = max(last.get(ev["id"], 0.0), ev["ts"])
    return states, accepted, last


# A submission answered 202 this long after it was first sent counts as delayed: on
# this machine an answer takes tens of milliseconds, a failover several seconds.
DELAYED = 2.0


def client_view(load: Any, windows: list[tuple[float, float]]) -> dict[str, Any]:
    """What the load's client saw: 5xx answers and broken connections (all, and
    within `windows`, the broker failovers as monotonic (start, end)), delayed
    submissions, the longest gap between two 202s while the load ran."""
    def inside(t: float) -> bool:
        return any(a <= t <= b for a, b in windows)

    times = sorted(load.accepted_at)
    gap = max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)
    delayed = [(t, w) for t, w in load.waited if w > DELAYED]
    return {
        "refused_5xx": dict(Counter(a for _, a in load.failed_at)),
        "refused_5xx_in_broker_failover": dict(Counter(a for t, a in load.failed_at if inside(t))),
        "why_503": dict(load.why_503),
        "delayed": len(delayed),
        "delayed_in_broker_failover": sum(1 for t, _ in delayed if inside(t)),
        "longest_wait_s": round(max((w for _, w in load.waited), default=0.0), 1),
        "longest_acceptance_gap_s": round(gap, 1),
    }


def stall_start(prev: int, committed: int, lag: int, since: float | None, t: float) -> float | None:
    """When the stall a stage is in began, after a sample at `t` found its committed
    offsets summing to `committed` (`prev` at the sample before) and `lag` records
    waiting; None when it is not stalled (it moved, or had nothing to read)."""
    if committed != prev or lag <= 0:
        return None
    return t if since is None else since


class StallWatch(threading.Thread):
    """Samples each stage's committed offsets and input end offsets every second;
    a stall is a stretch in which a stage had records to read and its committed
    offsets did not move. A sample the brokers did not answer extends the stretch
    it falls in (the stage is not known to have moved)."""

    def __init__(self, settings: Any, stages: list[str], every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.settings, self.stages, self.every = settings, stages, every
        self.longest: dict[str, float] = dict.fromkeys(stages, 0.0)
        self.running = True

    def run(self) -> None:
        from confluent_kafka import TopicPartition
        from confluent_kafka.admin import AdminClient, OffsetSpec

        from streams.app import input_topics
        from streams.topics import group_client, group_id

        admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap})
        groups = {s: group_client(self.settings, group_id(self.settings, s)) for s in self.stages}
        # stage -> (committed sum, since when it has not moved while lagging)
        last: dict[str, tuple[int, float | None]] = {}
        try:
            while self.running:
                t = time.monotonic()
                try:
                    md = admin.list_topics(timeout=2)
                    tps = {s: [TopicPartition(n, p) for n in input_topics(self.settings, s)
                               if n in md.topics for p in md.topics[n].partitions] for s in self.stages}
                    ends = {(tp.topic, tp.partition): f.result().offset for tp, f in admin.list_offsets(
                        {tp: OffsetSpec.latest() for ts in tps.values() for tp in ts},
                        request_timeout=2).items()}
                    for s in self.stages:
                        done = groups[s].committed(tps[s], timeout=2)
                        committed = sum(max(tp.offset, 0) for tp in done)
                        lag = sum(ends[(tp.topic, tp.partition)] for tp in done) - committed
                        prev, since = last.get(s, (committed, None))
                        since = stall_start(prev, committed, lag, since, t)
                        last[s] = (committed, since)
                        if since is not None:
                            self.longest[s] = max(self.longest[s], t - since)
                except Exception:  # a broker away: this sample says nothing
                    for s, (_c, since) in last.items():
                        if since is not None:
                            self.longest[s] = max(self.longest[s], t - since)
                time.sleep(max(0.0, self.every - (time.monotonic() - t)))
        finally:
            for c in groups.values():
                c.close()

    def stop(self) -> dict[str, float]:
        self.running = False
        self.join(30)
        return {s: round(v, 1) for s, v in self.longest.items()}


def replication_problems(cluster: Any, settings: Any, replicas: int = 3, min_isr: int = 2) -> list[str]:
    """The run's topics (the graph's, the retry tiers, the compacted ones, Faust's
    changelogs and leader topics: all under its prefix) and the consumer offsets
    whose replication factor or min.insync.replicas is not `replicas`/`min_isr`."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    md = admin.list_topics(timeout=10)
    names = sorted(n for n in md.topics if n.startswith(settings.topic_prefix) or n == "__consumer_offsets")
    out = []
    configs = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, n) for n in names])
    for res, fut in configs.items():
        isr = fut.result()["min.insync.replicas"].value
        rf = {len(p.replicas) for p in md.topics[res.name].partitions.values()}
        if rf != {replicas} or isr != str(min_isr):
            out.append(f"{res.name}: replicas {sorted(rf)}, min.insync.replicas {isr}")
    return out


def restart_exited(stack: Any, faults: list[str], now: float) -> None:
    """Like the supervisor (`mailflow up`) or an orchestrator: a replica that exited on
    its own is started again, during the load and the drain alike. (A replica whose
    offset commit never returned after the broker's restart exits after
    `faust_compat.COMMIT_STUCK`, 120 s: in a CI run that was during the drain, and the
    stage's mail waited, unrestarted, until the drain timed out.)"""
    for name, procs in stack.procs.items():
        for p in [p for p in procs if p.poll() is not None]:
            procs.remove(p)
            if name == "api":
                stack.start_api()
            else:
                stack.start_stage(name)
            faults.append(f"{now:.0f}s {name} exited with {p.returncode}; restarted")
            say(faults[-1])


# A drain that finishes nothing for this long leaves each live replica's
# `/debug/consumer` (its partitions, feeds and waiting tasks) next to its log, twice at
# most: what tells a stuck handler from a partition nothing fetches, after the fact.
STALL_DUMP = 60.0


def dump_consumers(stack: Any, label: str) -> None:
    """Every registered replica's ``/debug/consumer`` into the stack's logs folder."""
    logs = stack.data_dir / "logs"
    for _, entry in sorted(stack.registry().items()):
        url = entry.get("url")
        if not url:
            continue
        name = f"debug-{label}-{entry.get('stage')}-r{entry.get('replica')}-{entry.get('pid')}.json"
        try:
            status, body, _ = harness.http("GET", f"{url.rstrip('/')}/debug/consumer", timeout=10)
            text = (body.decode("utf-8", "replace") if isinstance(body, bytes)
                    else orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
            (logs / name).write_text(f"{status}\n{text}\n")
        except OSError as exc:  # a replica gone since it registered
            (logs / name).write_text(f"no answer: {exc!r}\n")
    say(f"no recipient finished for {STALL_DUMP:.0f}s: consumers' state in {logs}/debug-{label}-*")


def check(stack: Any, peer: Any, accepted: dict[str, list[str]], timeout: float,
          deliver_kills: list[float] | None = None,
          supervise: Callable[[], None] | None = None) -> dict[str, Any]:
    """Wait (up to `timeout`) until every accepted recipient is final, calling
    `supervise` at each look, then judge the run."""
    want = {(i, r) for i, rs in accepted.items() for r in rs}
    progress = {"done": -1, "since": time.monotonic(), "dumps": 0}

    def drained() -> bool:
        if supervise is not None:
            supervise()
        states, _, _ = final_states(stack)
        done = sum(1 for k in want if states.get(k))
        say(f"{done}/{len(want)} recipients final")
        now = time.monotonic()
        if done != progress["done"]:
            progress.update(done=done, since=now)
        elif now - progress["since"] >= STALL_DUMP * (progress["dumps"] + 1) and progress["dumps"] < 2:
            progress["dumps"] += 1
            dump_consumers(stack, f"stalled-{progress['dumps']}")
        return done >= len(want)

    try:
        harness.wait_for(drained, timeout, interval=5, what="every accepted recipient final")
    except Exception as exc:  # report what did not finish instead of only failing
        say(str(exc))
    time.sleep(3)  # anything replayed by a late restart lands now
    states, acc_ts, last = final_states(stack)
    problems: list[str] = []
    missing = sorted(k for k in want if not states.get(k))
    twice = sorted(k for k in want if len(states.get(k, ())) > 1)
    if missing:
        problems.append(f"{len(missing)} recipients in no final state, e.g. {missing[:3]}")
    if twice:
        problems.append(f"{len(twice)} recipients in two final states, e.g. {[(k, states[k]) for k in twice[:3]]}")
    by_state = Counter(next(iter(v)) for k, v in states.items() if k in want and len(v) == 1)

    # The peer: each delivered message exactly once, nothing that was not accepted.
    ehlo = stack.settings().ehlo_name
    # One snapshot of what arrived (the peer keeps receiving while this runs).
    ids = peer.message_ids()
    arrivals = [(m[3], m[1]) for m in peer.messages[:len(ids)]]  # (when, envelope recipients)
    arrived = Counter(ids)
    id_of = {f"<{i}@{ehlo}>": i for (i, r), v in states.items() if (i, r) in want and v == {"delivered"}}
    expected_ids = set(id_of)
    dup = {m: c for m, c in arrived.items() if m in expected_ids and c > 1}
    copies: dict[str, list[tuple[float, list[str]]]] = defaultdict(list)
    for mid, copy in zip(ids, arrivals, strict=True):
        copies[mid].append(copy)
    ledger = ledger_entries(stack)
    at_kill = {m: c for m, c in dup.items()
               if unrecorded_before_kill(copies[m], deliver_kills or [], ledger.get(id_of[m], []))}
    dup = {m: c for m, c in dup.items() if m not in at_kill}
    stray = [m for m in arrived if m not in expected_ids]
    lost = [m for m in expected_ids if m not in arrived]
    if dup:
        # Each copy's arrival and the deliver kills around it, as clock times: what
        # tells a kill's window from another cause.
        def clock(t: float) -> str:
            return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"

        def story(m: str, c: int) -> str:
            sent = ", ".join(f"{clock(t)} to {' '.join(rs)}" for t, rs in sorted(copies[m]))
            entries = sorted(ledger.get(id_of[m], []), key=lambda e: e[1])
            written = ", ".join(f"{clock(t)} for {r}" for r, t in entries) or "none"
            return f"{m} x{c} at {sent}, ledger entries at {written}"

        seen = [story(m, c) for m, c in list(dup.items())[:3]]
        kills = ", ".join(clock(k) for k in sorted(deliver_kills or []))
        problems.append(f"{len(dup)} messages delivered more than once: {'; '.join(seen)} "
                        f"(deliver kills at {kills or 'none'})")
    # Each delivered message's outcome durable in the ledger's changelog: what a
    # replica restoring the partition reads to not send it again.
    unledgered = sorted(i for i in id_of.values() if i not in ledger)
    if unledgered:
        problems.append(f"{len(unledgered)} delivered messages without a delivery ledger entry, "
                        f"e.g. {unledgered[:3]}")
    if stray:
        problems.append(f"{len(stray)} messages at the peer not delivered per status, e.g. {stray[:3]}")
    if lost:
        problems.append(f"{len(lost)} messages delivered per status but not at the peer, e.g. {lost[:3]}")

    # Local mailboxes: exactly their messages, each once.
    for box in LOCAL_BOXES:
        mine = sorted(i for i, rs in accepted.items() if box in rs)
        listing = stack.mailbox(box, limit=500) or {"messages": [], "total": -1}
        got = [m["id"] for m in listing["messages"]]
        while listing.get("next_cursor"):  # 500 per page at most
            listing = stack.mailbox(box, limit=500, cursor=listing["next_cursor"])
            got += [m["id"] for m in listing["messages"]]
        if sorted(got) != mine or listing["total"] != len(mine):
            problems.append(f"{box}: holds {len(got)} (total {listing['total']}), expected {len(mine)}; "
                            f"extra {sorted(set(got) - set(mine))[:3]}, "
                            f"missing {sorted(set(mine) - set(got))[:3]}, "
                            f"twice {[i for i, c in Counter(got).items() if c > 1][:3]}")
    delays = [last[i] - acc_ts[i] for i in accepted if i in last and i in acc_ts]
    return {
        "accepted_messages": len(accepted), "recipients": len(want), "final": dict(by_state),
        "at_peer": sum(arrived.values()), "longest_delay_s": round(max(delays, default=0.0), 1),
        "duplicates_at_deliver_kill": len(at_kill),
        "problems": problems, "ok": not problems,
    }


def run(duration: float, rate: float, kill_every: float, peer_down: float, clamd_down: float,
        work: Path, drain_timeout: float = 600, seed: int | None = None, brokers: int = 1,
        broker_kill_every: float = 60.0, broker_down: float = 10.0) -> dict[str, Any]:
    """One chaos run; `brokers` 1 is the single broker restarted once, 3 (or more) a
    cluster whose leading node is killed every `broker_kill_every` seconds (the first
    at a quarter of the run if that is sooner) and started `broker_down` s later."""
    rng = random.Random(seed)
    (work / "kafka").mkdir(parents=True, exist_ok=True)
    broker = cluster = None
    if brokers > 1:
        cluster = harness.Cluster(work / "kafka", brokers)
    else:
        port = harness.free_ports(2)  # below the ephemeral range: it is restarted on it
        broker = harness.Broker(work / "kafka", port, port + 1)
    clamd = Clamd(work / "clamd")
    peer = harness.ScriptedPeer().start()
    stack = None
    stall = None
    faults: list[str] = []
    deliver_kills: list[float] = []  # epoch seconds, like the peer's arrival times
    failovers: list[tuple[float, float]] = []  # monotonic (kill, back in sync or run's end)
    try:
        (cluster or broker).start()  # type: ignore[union-attr]
        bootstrap = (cluster or broker).bootstrap  # type: ignore[union-attr]
        clamd.start()
        say(f"{'cluster' if cluster else 'broker'} {bootstrap}, clamd :{clamd.port}, peer :{peer.port}")
        extra = {"replication": str(min(3, brokers))} if cluster else {}
        stack = harness.Stack(
            work, bootstrap, scanners="clamd,rspamd", clamd=f"127.0.0.1:{clamd.port}",
            scan_failure="closed", smtp_routes=f"*=127.0.0.1:{peer.port}", rate_limit="1000000/60s",
            retry_schedule="1s,2s,4s,8s", max_queue_age="1h", **extra)
        stack.start([s for s in dict.fromkeys(STAGES)])
        stack.start_stage("deliver")  # the second replica
        stall = StallWatch(stack.settings(), list(dict.fromkeys(STAGES)))
        stall.start()
        load = Load(stack.api, stack.ensure_key(), rate, duration)
        t0 = time.monotonic()
        load.start()
        # When each one-off fault starts, as a share of the run.
        plan = {"peer": 0.45, "clamd": 0.7, **({} if cluster else {"broker": 0.25})}
        next_kill = kill_every
        next_node_kill = min(0.25 * duration, broker_kill_every)
        down_node: tuple[int, float, float] | None = None  # (node, killed at, restart at)
        restarted: tuple[int, float, float] | None = None  # (node, killed at, restarted at)
        # Outages that end on their own: what goes down, for how long, how, and back.
        outages = {"peer": ("SMTP peer", peer_down, peer.stop, peer.up),
                   "clamd": ("clamd", clamd_down, clamd.stop, clamd.start)}
        back: dict[str, float] = {}  # outage -> when it ends
        last_probe = 0.0
        while load.is_alive() or back or down_node or restarted:
            now = time.monotonic() - t0
            if now >= next_kill and load.is_alive():
                name = rng.choice(STAGES)
                live = [p for p in stack.procs.get(name, []) if p.poll() is None]
                if live:
                    p = rng.choice(live)
                    os.killpg(p.pid, signal.SIGKILL)
                    if name == "deliver":
                        deliver_kills.append(time.time())
                    p.wait(60)
                    stack.procs[name].remove(p)
                    stack.start_stage(name)
                    faults.append(f"{now:.0f}s kill -9 {name}")
                    say(faults[-1])
                next_kill += kill_every
            restart_exited(stack, faults, now)
            if broker is not None and "broker" in plan and now >= plan["broker"] * duration:
                del plan["broker"]
                say("broker: kill -9 and restart")
                killed = time.monotonic()
                broker.stop(kill=True)
                broker.start()
                failovers.append((killed, time.monotonic()))
                faults.append(f"{now:.0f}s broker restarted ({time.monotonic() - t0 - now:.0f}s down)")
                say(faults[-1])
            if cluster is not None:
                if (down_node is None and restarted is None and now >= next_node_kill
                        and load.is_alive()):
                    # The node leading the most of the run's partitions: the kill that
                    # moves the most leaders (and the group coordinators with them).
                    leads = cluster.leaders(stack.prefix)
                    node = max(leads, key=lambda k: (leads[k], -k))
                    cluster.kill_node(node)
                    down_node = (node, time.monotonic(), time.monotonic() + broker_down)
                    faults.append(f"{now:.0f}s kill -9 broker node {node} (leading {leads[node]} "
                                  f"of {sum(leads.values())} partitions)")
                    say(faults[-1])
                    next_node_kill = now + broker_kill_every
                if down_node and time.monotonic() >= down_node[2]:
                    cluster.start_node(down_node[0], wait=False)
                    restarted = (down_node[0], down_node[1], time.monotonic())
                    down_node = None
                    say(f"broker node {restarted[0]} started again")
                if restarted and time.monotonic() - last_probe > 1.0:
                    # The failover is over once the node serves again and every
                    # partition has its replicas back in sync.
                    last_probe = time.monotonic()
                    node, killed, started = restarted
                    try:
                        in_sync = (cluster.alive(node) and node_serves(cluster, node)
                                   and not cluster.under_replicated(stack.prefix))
                    except Exception:
                        in_sync = False
                    if in_sync:
                        failovers.append((killed, time.monotonic()))
                        faults.append(f"{now:.0f}s broker node {node} back in sync "
                                      f"({time.monotonic() - killed:.0f}s after the kill, "
                                      f"{time.monotonic() - started:.0f}s after its start)")
                        say(faults[-1])
                        restarted = None
                    elif not cluster.alive(node):
                        faults.append(f"{now:.0f}s broker node {node} exited; started again")
                        say(faults[-1])
                        cluster.start_node(node, wait=False)
                    elif time.monotonic() - started > 300:
                        raise RuntimeError(f"broker node {node} not back in sync after 300 s")
            for name, (label, length, down, up) in outages.items():
                if name in plan and now >= plan[name] * duration:
                    del plan[name]
                    down()
                    back[name] = now + length
                    faults.append(f"{now:.0f}s {label} down for {length:.0f}s")
                    say(faults[-1])
                if name in back and now >= back[name]:
                    up()
                    del back[name]
                    say(f"{label} back")
            time.sleep(0.2)
        load.join()
        stalls = stall.stop()
        if load.unanswered:
            say(f"load done; asking again about {len(load.unanswered)} messages given up on")
            load.settle()
        say(f"load done: {len(load.accepted)} accepted ({load.settled} of them once the load was "
            f"over), retried {dict(load.retried)}, refused {dict(load.refused)}; draining")
        report = check(stack, peer, load.accepted, drain_timeout, deliver_kills,
                       supervise=lambda: restart_exited(stack, faults, time.monotonic() - t0))
        if load.unanswered:  # their fate is unknown, so the run proves nothing about them
            report["problems"].append(f"{len(load.unanswered)} submissions never answered")
            report["ok"] = False
        if cluster is not None:
            wrong = replication_problems(cluster, stack.settings(), min(3, brokers), min(2, brokers))
            if wrong:
                report["problems"].append(f"{len(wrong)} topics not replicated as asked: {wrong[:5]}")
            lagging = cluster.under_replicated(stack.prefix)
            if lagging:
                report["problems"].append(f"{len(lagging)} partitions under-replicated at the end, "
                                          f"e.g. {lagging[:5]}")
            report["ok"] = not report["problems"]
        report.update({"duration_s": duration, "rate": rate, "brokers": brokers,
                       "refused": dict(load.refused), "retried": dict(load.retried),
                       "settled_after_load": load.settled, "faults": faults,
                       "broker_failovers": len(failovers),
                       "failover_s": [round(b - a, 1) for a, b in failovers],
                       "longest_stall_s": stalls, **client_view(load, failovers)})
        return report
    finally:
        if stall is not None:
            stall.running = False
        if stack is not None:
            stack.stop()
        peer.stop()
        clamd.stop()
        (cluster or broker).stop()  # type: ignore[union-attr]


def node_serves(cluster: Any, node: int) -> bool:
    """Whether cluster node `node` answers a metadata request on its own port."""
    from devtools.broker import is_ready

    return is_ready(cluster.nodes[node - 1].bootstrap)


def ensure_services() -> ServiceGroup | None:
    """rspamd and the loopback DNS server, which the run's stack uses on their default
    ports: reused if they answer, else started now (the caller stops what was
    started). Checked before the run: without rspamd every message would wait in the
    scan stage (scan failure closed) and the run would only end at its drain timeout."""
    missing = []
    if not rspamd_ping():
        missing.append(prepare_rspamd(DEFAULT_DATA_DIR / "rspamd"))
    if not dns_ping():
        missing.append(prepare_dnsmasq(DEFAULT_DATA_DIR / "dnsmasq", DEFAULT_DNS_CONF))
    if not missing:
        return None
    say(f"starting {', '.join(svc.name for svc in missing)} for this run (under {DEFAULT_DATA_DIR})")
    group = ServiceGroup(missing, log=say)
    group.start(120)
    return group


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", default="5m", help="how long to submit (e.g. 5m)")
    p.add_argument("--rate", type=float, default=200, help="messages per second")
    p.add_argument("--kill-every", default="30s", help="kill -9 a random stage replica this often")
    p.add_argument("--peer-down", default="60s", help="how long the SMTP peer is down")
    p.add_argument("--clamd-down", default="30s", help="how long clamd is down")
    p.add_argument("--drain-timeout", default="15m", help="how long to wait for the pipeline to drain")
    p.add_argument("--seed", type=int, help="random seed for the choice of replicas to kill")
    p.add_argument("--brokers", type=int, default=1,
                   help="1: the single broker, restarted once; 3: a three-node cluster, replication 3")
    p.add_argument("--broker-kill-every", default="60s",
                   help="with --brokers 3: kill -9 the node leading the most partitions this often")
    p.add_argument("--broker-down", default="10s", help="how long a killed node stays down")
    p.add_argument("--keep", metavar="DIR", type=Path,
                   help="run in DIR and keep it (every process's log) instead of a temporary one")
    a = p.parse_args()
    try:
        services = ensure_services()
    except Exception as exc:  # noqa: BLE001 (said, with what to run instead)
        print(f"chaos: rspamd or the loopback DNS server could not be started ({exc}); "
              "start them with: .venv/bin/python -m devtools.services up", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="mailflow-chaos-") as tmp:
            work = a.keep or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            report = run(parse_duration(a.duration), a.rate, parse_duration(a.kill_every),
                         parse_duration(a.peer_down), parse_duration(a.clamd_down), work,
                         parse_duration(a.drain_timeout), a.seed, a.brokers,
                         parse_duration(a.broker_kill_every), parse_duration(a.broker_down))
    finally:
        if services is not None:
            services.stop()
    print(f"accepted {report['accepted_messages']} messages ({report['recipients']} recipients); "
          f"final {report['final']}; at the peer {report['at_peer']}; "
          f"longest delay {report['longest_delay_s']} s; copies sent twice in a deliver "
          f"replica's kill window {report['duplicates_at_deliver_kill']}")
    print(f"{report['brokers']} broker(s), {report['broker_failovers']} broker failovers "
          f"({report['failover_s']} s); 5xx answers {report['refused_5xx']} "
          f"({report['refused_5xx_in_broker_failover']} in failovers); delayed > {DELAYED:.0f} s "
          f"{report['delayed']} ({report['delayed_in_broker_failover']} in failovers); longest "
          f"wait {report['longest_wait_s']} s; longest gap in acceptance "
          f"{report['longest_acceptance_gap_s']} s; longest stall per stage {report['longest_stall_s']}")
    for line in report["problems"]:
        print(f"PROBLEM: {line}")
    print("all checks passed" if report["ok"] else "CHECKS FAILED")
    print(orjson.dumps(report).decode())
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
