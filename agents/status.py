"""Status stage, and `GET /v1/messages/{id}`.

Input: ``events`` (one event keyed by its message id, or a batch of a partition's
events: `streams.events`). Output: the ``status`` table (message id ->
state per recipient and the timeline), served by a Faust web view routed by id to
the replica that owns it.

The table is written to the local store as each batch is applied, so a GET
answers with it at once; its changelog records are sent once a second, one per
message written in that second, and the input is committed only after they are
acknowledged (a crash re-reads at most that second's events, applied again
idempotently). The stage is off the mail's path, so it fetches in fuller answers
(`streams.faust_compat.BATCHED`): an event is applied at most 200 ms after it is
written on an idle stack, and the GET may show it that much later.

Each recipient reaches exactly one final state: the first final state recorded
wins, later ones (a replayed event) only join the timeline. Events may arrive a
little out of order across stages, so a recipient's state only moves forward.
"""

from __future__ import annotations

from typing import Any

import faust

from mailflow import metrics
from mailflow.config import Settings
from schemas.records import Event, PoisonPill, parse_events
from schemas.states import FINAL
from streams.faust_compat import BATCHED
from streams.runtime import JSON_TABLE, Outputs, Stage, table_get

STAGE = "status"

# How far along each non-final state is; a state never moves back.
# `held` (an operator's hold, `mailflow queue hold`) ranks with `deferred`: a held
# record may have been deferred before, and is deferred or delivered after.
RANK = {"accepted": 0, "replayed": 0, "validated": 1, "scanned": 2, "sent_folder": 3, "deferred": 4,
        "held": 4}
WAITING_ON = {
    "accepted": "ratelimit/validate", "validated": "scan (outgoing)",
    "scanned": "sentfolder (clean)", "sent_folder": "deliver (delivery)",
    "deferred": "retry", "replayed": "the stage it was replayed into",
    "held": "an operator's release (mailflow queue release)",
}
MAX_TIMELINE = 200
# Seconds the status table's changelog records are held (`Stage.run_whole_batches`):
# a GET sees a write at once; the input's commit, so this stage's lag, waits.
CHANGELOG_EVERY = 1.0


def apply_event(status: dict[str, Any] | None, ev: Event) -> tuple[dict[str, Any], list[str]]:
    """The message's status after `ev`, and the recipients it made final."""
    st: dict[str, Any] = status or {"id": ev.id, "recipients": {}, "timeline": []}
    if ev.sender is not None and "sender" not in st:
        st["sender"] = ev.sender
    if ev.state == "accepted":
        st.setdefault("accepted_at", ev.ts)
    rcpts = st["recipients"]
    targets = list(rcpts) if ev.recipients is None else ev.recipients
    finalized = []
    for r in targets:
        cur = rcpts.get(r)
        if ev.state == "replayed":
            # An operator put parked mail back: the recipient is open again, and
            # will reach one new final state.
            rcpts[r] = {"state": "replayed", "ts": ev.ts, "detail": ev.detail}
            continue
        if cur and cur["state"] in FINAL:
            continue
        if cur and ev.state not in FINAL and RANK.get(ev.state, 0) < RANK.get(cur["state"], 0):
            continue
        rcpts[r] = {"state": ev.state, "ts": ev.ts, **({"detail": ev.detail} if ev.detail else {})}
        if ev.state in FINAL:
            finalized.append(r)
    entry = {"ts": ev.ts, "stage": ev.stage, "state": ev.state}
    if ev.recipients is not None:
        entry["recipients"] = ev.recipients
    if ev.detail:
        entry["detail"] = ev.detail
    timeline = st["timeline"]
    if entry not in timeline:  # a replayed event is recorded once
        timeline.append(entry)
        timeline.sort(key=lambda e: e["ts"])
        del timeline[:-MAX_TIMELINE]
    st["final"] = bool(rcpts) and all(v["state"] in FINAL for v in rcpts.values())
    return st, finalized


def view_of(st: dict[str, Any]) -> dict[str, Any]:
    """The API's answer: per recipient, with what a waiting one waits on."""
    out = dict(st)
    out["recipients"] = {
        r: ({**v, "waiting_on": WAITING_ON[v["state"]]} if v["state"] in WAITING_ON else v)
        for r, v in st["recipients"].items()
    }
    states = {v["state"] for v in st["recipients"].values()}
    out["state"] = states.pop() if len(states) == 1 else "mixed"
    return out


def register(app: faust.App, settings: Settings) -> Stage:
    stage = Stage(app, settings, STAGE, fetch=BATCHED)  # off the mail's path
    table = app.Table("status", partitions=settings.partitions, schema=JSON_TABLE)

    async def handle(events: list[faust.EventT[Any]]) -> Outputs:
        """Apply a batch of events; each message's status is written once per batch."""
        out = stage.outputs()
        changed: dict[str, tuple[dict[str, Any], faust.EventT[Any]]] = {}  # id -> (status, its event)
        for event in events:
            try:
                evs = parse_events(event.value)
            except PoisonPill as pill:  # one bad record must not hold the batch
                out.park(pill.reason, "poison", event.value, detail=pill.detail)
                continue
            for ev in evs:  # a batch record's events all belong to its partition
                before = changed[ev.id][0] if ev.id in changed else table_get(table, ev.id, event)
                st, finalized = apply_event(before, ev)
                changed[ev.id] = (st, event)
                if finalized and "accepted_at" in st:
                    metrics.END_TO_END_SECONDS.labels(ev.state).observe(max(0.0, ev.ts - st["accepted_at"]))
        for msg_id, (st, event) in changed.items():
            out.write(table, msg_id, st, event)  # in the partition of the event's record
        return out

    # A batch at a time, applied in offset order without an await in between, so a
    # message's events apply in order, and the several events one message gets in a
    # batch (a busy moment) cost one table write. A batch that fails on the way to
    # Kafka is applied again whole: apply_event is idempotent per event. The
    # changelog records are held for CHANGELOG_EVERY: a message's six events come
    # over a second or more, and one record per message and second is what the
    # changelog then carries (5.3 a message without it, docs/BENCHMARKS.md).
    stage.agent("events", handle, mode="whole", hold=CHANGELOG_EVERY)

    @app.page("/v1/messages/{msg_id}")
    @app.table_route(table=table, match_info="msg_id")
    async def get_status(view: Any, request: Any, msg_id: str) -> Any:
        st = table.get(msg_id)
        if st is None:
            return view.json({"error": {"code": "not_found", "message": f"no message {msg_id}"}},
                             status=404)
        return view.json(view_of(st))

    return stage
