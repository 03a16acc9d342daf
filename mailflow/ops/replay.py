"""`mailflow replay errors|dead`: put parked mail back into the flow after a fix.

Each parked record goes back to the input of the stage that parked it: a
rejected message to ``admitted`` (validate again), a quarantined one to
``outgoing`` (scan again), a rate-limited one to ``submissions``, a dead one to
``delivery`` for the recipients that failed, with its attempt count reset.
A ``replayed`` event reopens those recipients in the status, so each still has
exactly one final state at a time. Replaying twice does not deliver twice: the
delivery ledger and the idempotent stores skip what already happened.

Poison records (not JSON, wrong schema: `schemas.mail`'s parser for the topic it
would go back to refuses it) are listed, never replayed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import Producer

from mailflow.config import Settings, parse_duration
from mailflow.kafka_io import producer_config, read_to_end
from mailflow.rules.mailrules import group_by_domain
from schemas.mail import (
    Delivery,
    LocalCopy,
    MailRecord,
    parse_delivery,
    parse_local,
    parse_outgoing,
    parse_submission,
)
from schemas.records import Event, PoisonPill, parse_error
from streams.topics import full_name

# Where a record parked by a stage goes back in.
BACK_TO = {"ratelimit": "submissions", "validate": "admitted", "scan": "outgoing",
           "store": "local", "sentfolder": "clean", "deliver": "delivery"}
# How each of those topics' readers parse a record (schemas/mail.py).
PARSE: dict[str, Callable[[str], MailRecord]] = {
    "submissions": parse_submission, "admitted": parse_submission, "local": parse_local,
    "outgoing": parse_outgoing, "clean": parse_outgoing, "delivery": parse_delivery}


@dataclass
class Replay:
    topic: str
    key: bytes | None
    value: bytes
    msg_id: str
    recipients: list[str]


def plan_error(raw: bytes, reason: str | None, since: float | None) -> Replay | None:
    """The replay of one ``errors`` record, or None if filtered out or not replayable."""
    try:
        err = parse_error(raw)
        if (reason and err.reason != reason) or (since and err.ts < since):
            return None
        if err.state == "poison" or err.stage not in BACK_TO or not err.record:
            return None
        target = BACK_TO[err.stage]
        rec = PARSE[target](err.record)  # what the stage it goes back to will read
    except PoisonPill:
        return None
    if isinstance(rec, LocalCopy):
        key = rec.mailbox
    elif isinstance(rec, Delivery):
        key = rec.route_domain()
    else:
        key = rec.sender if target in ("submissions", "admitted") else rec.id
    return Replay(target, key.encode(), err.record.encode(), rec.id, rec.recipients)


def plan_dead(raw: bytes, reason: str | None, since: float | None, now: float) -> list[Replay]:
    """Replays of one ``dead`` record: one per domain of its failed recipients."""
    try:
        msg = parse_delivery(raw)
    except PoisonPill:
        return []
    dead = msg.retry.dead
    if (reason and (dead is None or dead.reason != reason)) or (since and (dead.ts if dead else 0.0) < since):
        return []
    # A fresh start: no attempts spent, the queue age from now; `replayed_at` lets the
    # ledger try a permanently failed recipient once more (agents/deliver.py may_send).
    state = msg.retry.with_(dead=None, due=None, tier=None, attempt=0, first_attempt=now, replayed_at=now)
    out = []
    for domain, rcpts in group_by_domain(msg.recipients).items():
        rec = msg.with_(recipients=rcpts, domain=domain, retry=state)
        out.append(Replay("delivery", domain.encode(), rec.to_json(), msg.id, rcpts))
    return out


def read_all(settings: Settings, short: str) -> list[bytes]:
    """Every record on a topic up to its current end (tombstones left out)."""
    records = read_to_end(settings.kafka_bootstrap, full_name(settings, short))
    return [v for _, v in records if v is not None]


def run(settings: Settings, source: str, reason: str | None, since_text: str | None,
        dry_run: bool = False, ids: list[str] | None = None) -> int:
    now = time.time()
    since = now - parse_duration(since_text) if since_text else None
    records = read_all(settings, source)
    plans: list[Replay] = []
    for raw in records:
        plans += plan_dead(raw, reason, since, now) if source == "dead" else (
            [p] if (p := plan_error(raw, reason, since)) else [])
    if ids:
        plans = [p for p in plans if p.msg_id in ids]
    print(f"replay: {len(records)} records on {source}, {len(plans)} to put back"
          + (" (dry run)" if dry_run else ""), file=sys.stderr)
    counts: dict[str, int] = {}
    if not dry_run and plans:
        producer = Producer(producer_config(settings.kafka_bootstrap))
        for plan in plans:
            ev = Event(id=plan.msg_id, state="replayed", stage="replay", recipients=plan.recipients,
                       detail={"from": source})
            producer.produce(full_name(settings, "events"), key=plan.msg_id.encode(), value=ev.to_json())
            producer.produce(full_name(settings, plan.topic), key=plan.key, value=plan.value)
            counts[plan.topic] = counts.get(plan.topic, 0) + 1
        left = producer.flush(60)
        if left:
            print(f"replay: {left} records not acknowledged by Kafka; run it again", file=sys.stderr)
            return 1
    summary: dict[str, Any] = {"source": source, "read": len(records), "replayed": 0 if dry_run else len(plans),
                               "planned": len(plans), "to": counts}
    print(orjson.dumps(summary).decode())
    return 0
