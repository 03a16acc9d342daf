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
"""

from __future__ import annotations

import time

import faust
import orjson

from agents.common import JSON_TABLE, Pending, StageIO, acked_table, acked_writes
from mailflow.config import Settings
from schemas.records import parse_message

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


def register(app: faust.App, settings: Settings) -> None:
    io = StageIO(app, settings, STAGE)
    limit, window = settings.rate_limit
    # An AckedTable: each count's changelog record is acknowledged by Kafka before
    # the input offset commits, so a worker killed -9 restores every count it had.
    counts = (
        acked_table(app, "sender_counts", default=int, partitions=settings.partitions,
                    schema=JSON_TABLE)
        .tumbling(window, expires=window * 2)
        .relative_to_stream()
    )

    async def handle(raw: bytes | None, event: faust.EventT) -> Pending:
        msg = parse_message(raw)
        pending: Pending = [await io.event(msg.id, "accepted", msg.recipients,
                                           sender=msg.sender, ts=msg.received_at)]
        # No await between the read and the write: the batch's records cannot
        # interleave here. The window is the one of this record's Kafka timestamp.
        with acked_writes() as acks:
            window_set = counts[msg.sender][event]
            window_set += 1
        pending += acks
        count = window_set.current()
        if should_throttle(count, limit):
            _, until = window_bounds(event.message.timestamp or time.time(), window)
            pending.append(await io.send(
                "throttle", msg.sender,
                orjson.dumps({"sender": msg.sender, "until": until, "limit": limit}),
            ))
        if over_limit(count, limit):
            detail = f"over {limit} messages per {window:g}s"
            pending.append(await io.park("rate_limited", "rate_limited", raw, msg.id, detail))
            pending.append(await io.event(msg.id, "rate_limited", msg.recipients,
                                          {"reason": "rate_limited", "message": detail},
                                          sender=msg.sender))
        else:
            # Pass the record on as it came: no re-encoding on the hot path.
            pending.append(await io.send("admitted", msg.sender, raw))
        return pending

    @app.agent(io.topic("submissions"), name=f"{settings.topic_prefix}{STAGE}")
    async def ratelimit(stream: faust.StreamT) -> None:
        await io.run_batches(stream, handle, with_event=True)
