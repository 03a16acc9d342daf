"""Rate limiter stage.

Input: ``submissions`` (key: sender). Outputs: ``admitted`` (key: sender) for mail
within the sender's limit; ``errors`` with state ``rate_limited`` for mail over it;
``throttle`` (compacted, key: sender) telling the ingress until when to answer 429;
``events`` (``accepted``, ``rate_limited``).

Counts live in a Faust tumbling windowed table per sender (``RATE_LIMIT``, e.g.
``100/60s``), windows taken from the record's Kafka timestamp, so replays and
restarts count in the window the mail was submitted in. A count's changelog record
is acknowledged by Kafka before the input offset commits, so a replica killed -9
comes back with every count it had (a replayed record may count twice: the limit
errs on the strict side, never the lax one).

A record this replica has decided already (read again after a table recovery, or
redone after an output failed) gets the same decision again, without counting: a
message is never both admitted and rate limited by one replica (`Decisions`). If it
was the count's own changelog record that failed, a replica that restores that
window from the changelog later counts it once less. Across replicas (one killed
before its commit, another reading the record again) a message can still count twice.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import faust
import orjson

from mailflow.config import Settings
from schemas.mail import parse_submission
from streams.runtime import JSON_TABLE, Outputs, Stage

STAGE = "ratelimit"


def window_bounds(ts: float, size: float) -> tuple[float, float]:
    """The tumbling window [start, end) that timestamp `ts` falls in."""
    start = ts - (ts % size)
    return start, start + size


def over_limit(count: int, limit: int) -> bool:
    """`count` includes the message being decided."""
    return count > limit


def should_throttle(count: int, limit: int) -> bool:
    """Tell the ingress to refuse more once the window is full."""
    return count >= limit


class Decisions:
    """The latest `kept` decisions of this replica, by message id: over the limit or
    not, and whether the ingress was told to throttle.

    Faust may hand a stage a record it has handled already: records fetched between
    a table recovery's resume of the input partitions and its seek to the committed
    offsets are handled, then read again from the commit (seen in
    tests/pipeline/test_ratelimit_restore.py: the third message of a limit of three
    admitted, then parked as rate limited on its second reading). Counting it again
    would make the second decision differ from the first."""

    def __init__(self, kept: int = 50_000) -> None:
        self.kept = kept
        self._by_id: OrderedDict[str, tuple[bool, bool]] = OrderedDict()

    def get(self, msg_id: str) -> tuple[bool, bool] | None:
        return self._by_id.get(msg_id)

    def add(self, msg_id: str, decision: tuple[bool, bool]) -> None:
        self._by_id[msg_id] = decision
        if len(self._by_id) > self.kept:
            self._by_id.popitem(last=False)


def register(app: faust.App, settings: Settings) -> Stage:
    stage = Stage(app, settings, STAGE)
    limit, window = settings.rate_limit
    # Each count's changelog record is acknowledged by Kafka before the input
    # offset commits (`Outputs.window_add`), so a worker killed -9 restores every
    # count it had.
    counts = stage.windowed_table("sender_counts", window, expires=window * 2, default=int,
                                  partitions=settings.partitions, schema=JSON_TABLE)

    decisions = Decisions()

    async def handle(raw: bytes | None, event: faust.EventT[Any]) -> Outputs:
        msg = parse_submission(raw)
        out = stage.outputs()
        out.event(msg.id, "accepted", msg.recipients, sender=msg.sender, ts=msg.received_at)
        decided = decisions.get(msg.id)
        if decided is None:
            # No await between this read and the runtime's write of the count: the
            # batch's records cannot interleave here. The window is the one of this
            # record's Kafka timestamp.
            count = counts[msg.sender][event].current() + 1
            out.window_add(counts, msg.sender, event)
            decided = (over_limit(count, limit), should_throttle(count, limit))
            decisions.add(msg.id, decided)
        limited, throttle = decided
        if throttle:
            _, until = window_bounds(event.message.timestamp or time.time(), window)
            out.send("throttle", msg.sender,
                     orjson.dumps({"sender": msg.sender, "until": until, "limit": limit}))
        if limited:
            detail = f"over {limit} messages per {window:g}s"
            out.park("rate_limited", "rate_limited", raw, msg.id, detail)
            out.event(msg.id, "rate_limited", msg.recipients,
                      {"reason": "rate_limited", "message": detail}, sender=msg.sender)
        else:
            # Pass the record on as it came: no re-encoding on the hot path.
            out.send("admitted", msg.sender, raw)
        return out

    stage.agent("submissions", handle, with_event=True)
    return stage
