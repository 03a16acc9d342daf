"""Latency on an idle stack: one message at a time, and where each one's time went.

Usage (a broker must be running, e.g. ``mailflow broker``)::

    python bench/idle.py                       # 20 remote + 20 local messages, one a second
    python bench/idle.py --count 40 --every 0.5 --scanners none

It starts its own stack on the running broker (fresh topic prefix, every stage and
one API process, as ``mailflow bench --start all``), remote mail routed to Postfix's
``smtp-sink``, waits ``--settle`` seconds after the stages joined, then submits
``--count`` remote and ``--count`` local messages alternately, one every
``--every`` seconds, each on its own (the next starts only after the previous was
accepted). It follows the ``events`` topic and, per message, takes the time of
each status event (the ``ts`` its stage wrote):

* remote: submission → ``accepted`` (API and ratelimit) → ``validated`` →
  ``scanned`` → ``sent_folder`` (sentfolder) → ``delivered``; and ``sent_folder``
  → the Sent copy stored (store's ``sent_folder`` with a mailbox);
* local: submission → ``accepted`` → ``stored``.

It prints each message's hops, then the p50/p99/max per hop, and as its last line
one JSON object with them (milliseconds), including ``submit→delivered`` and
``submit→stored`` end to end. Messages are numbered in the order sent, so a slow
first one after start shows as message 0. The stack's topics and data dir are
deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson

# The hops of a message, as (name, from state, to state); "submit" is the request's start.
REMOTE_HOPS = (("api+ratelimit", "submit", "accepted"), ("validate", "accepted", "validated"),
               ("scan", "validated", "scanned"), ("sentfolder", "scanned", "sent_folder"),
               ("deliver", "sent_folder", "delivered"), ("store (Sent copy)", "sent_folder", "sent_copy"),
               ("submit→delivered", "submit", "delivered"))
LOCAL_HOPS = (("api+ratelimit", "submit", "accepted"), ("validate+store", "accepted", "stored"),
              ("submit→stored", "submit", "stored"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=20, help="messages of each kind (default 20)")
    p.add_argument("--every", type=float, default=1.0, help="seconds between messages (default 1)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds to wait after the stages joined (default 5)")
    p.add_argument("--scanners", default=os.environ.get("MAILFLOW_SCANNERS", "none"),
                   help="MAILFLOW_SCANNERS for the stack (default none)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the last message")
    return p.parse_args(argv)


def pct(values: list[float], q: float) -> float:
    """The `q` quantile (nearest rank) of `values`, NaN for none."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def hop_times(times: dict[str, float], hops: Sequence[tuple[str, str, str]]) -> dict[str, float]:
    """Milliseconds per hop of one message whose state times (epoch s) are `times`."""
    return {name: round((times[b] - times[a]) * 1000, 1) for name, a, b in hops
            if a in times and b in times}


def summarize(per_message: list[dict[str, float]], hops: Sequence[tuple[str, str, str]]
              ) -> dict[str, dict[str, float]]:
    """p50, p99 and max per hop over `per_message` (each a `hop_times` result)."""
    out = {}
    for name, _, _ in hops:
        vals = [m[name] for m in per_message if name in m]
        if vals:
            out[name] = {"p50": pct(vals, 0.5), "p99": pct(vals, 0.99), "max": max(vals), "n": len(vals)}
    return out


class Follower(threading.Thread):
    """Every status event of the stack, as state → first time, per message id."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        from confluent_kafka import Consumer

        from devtools.bench import assign_at_end

        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"idle-{uuid.uuid4().hex[:8]}",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        self.times: dict[str, dict[str, float]] = {}
        self.lock = threading.Lock()
        self.running = True
        assign_at_end(self.consumer, topic)

    def run(self) -> None:
        from schemas.records import event_dicts

        while self.running:
            for m in self.consumer.consume(100, 0.1):
                if m.error():
                    continue
                for ev in event_dicts(m.value()):
                    state = ev["state"]
                    if ev.get("stage") == "store" and state == "sent_folder":
                        state = "sent_copy"
                    with self.lock:
                        self.times.setdefault(ev["id"], {}).setdefault(state, ev["ts"])

    def stop(self) -> None:
        self.running = False
        self.join(5)
        self.consumer.close()


async def submit(api: str, key: str, args: argparse.Namespace, local_domain: str
                 ) -> list[tuple[int, str, str, float]]:
    """(n, kind, id, submission time) per accepted message, one at a time."""
    import aiohttp

    from devtools.bench import message

    out = []
    headers = {"Content-Type": "message/rfc822", "Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        start = time.perf_counter()
        for n in range(2 * args.count):
            await asyncio.sleep(max(0.0, start + n * args.every - time.perf_counter()))
            kind = "remote" if n % 2 == 0 else "local"
            rcpt = f"user{n}@d{n % 7}.idle.test" if kind == "remote" else f"box{n}@{local_domain}"
            wall = time.time()
            async with http.post(f"{api}/v1/messages",
                                 data=message(n, f"idle{n}@{local_domain}", rcpt, 4096)) as resp:
                doc = await resp.read()
            if resp.status == 202:
                out.append((n, kind, orjson.loads(doc)["id"], wall))
            else:
                print(f"idle: message {n}: {resp.status} {doc[:200]!r}", file=sys.stderr, flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from devtools.bench import remove_stack, start_smtp_sink, start_stack
    from mailflow.config import Settings
    from streams.topics import full_name

    sink, port = start_smtp_sink("-c")
    os.environ["MAILFLOW_SMTP_ROUTES"] = f"*=127.0.0.1:{port}"
    os.environ["MAILFLOW_SCANNERS"] = args.scanners
    settings = Settings.from_env()
    stack_args = argparse.Namespace(start="all", api_workers=1, key=None)
    sup = None
    try:
        settings, sup, api = start_stack(settings, stack_args)
        time.sleep(args.settle)
        follower = Follower(settings.kafka_bootstrap, full_name(settings, "events"))
        follower.start()
        sent = asyncio.run(submit(api, stack_args.key, args, sorted(settings.local_domains)[0]))
        final = {"remote": "delivered", "local": "stored"}
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            with follower.lock:
                if all(final[k] in follower.times.get(i, {}) and
                       (k == "local" or "sent_copy" in follower.times.get(i, {}))
                       for _, k, i, _ in sent):
                    break
            time.sleep(0.2)
        follower.stop()
    finally:
        if sup is not None:
            sup.stop()
            remove_stack(settings)
        sink.terminate()
    per: dict[str, list[dict[str, float]]] = {"remote": [], "local": []}
    for n, kind, msg_id, wall in sent:
        times = {"submit": wall, **follower.times.get(msg_id, {})}
        hops = hop_times(times, REMOTE_HOPS if kind == "remote" else LOCAL_HOPS)
        per[kind].append(hops)
        print(f"message {n:3d} {kind:6s} " + "  ".join(f"{k} {v:.0f}" for k, v in hops.items()),
              flush=True)
    result: dict[str, Any] = {"bench": "idle", "count": args.count, "every": args.every,
                              "scanners": args.scanners,
                              "remote": summarize(per["remote"], REMOTE_HOPS),
                              "local": summarize(per["local"], LOCAL_HOPS),
                              "missing": [i for _, k, i, _ in sent
                                          if final[k] not in follower.times.get(i, {})]}
    for kind in ("remote", "local"):
        for name, s in result[kind].items():
            print(f"{kind:6s} {name:20s} p50 {s['p50']:7.1f} ms  p99 {s['p99']:7.1f} ms  "
                  f"max {s['max']:7.1f} ms  (n {s['n']})")
    print(json.dumps(result))
    return 0 if not result["missing"] else 1


if __name__ == "__main__":
    sys.exit(main())
