"""Webhooks stage: state changes POSTed, signed, to the endpoints that asked for them.

Input: ``events`` (one event or a batch of them, `streams.events`), in its own consumer group
(``<prefix>webhooks``), so a slow or absent receiver shows as this stage's lag and
never as the mail's. Outputs: HTTP POSTs (see `mailflow.webhooks` for the body and
the ``Mailflow-Signature`` header); ``webhooks.retry.1..N`` (key: webhook id) for
deliveries that failed; ``errors`` for deliveries given up after
``MAILFLOW_WEBHOOK_MAX_AGE`` (3 days).

For each event, each recipient it is about and each registered webhook that wants
its state and may hear of its sender (`mailflow.webhooks.matches`; the stages name
the sender in every event a webhook can ask for), one POST is tried at once. The
stage keeps no table: a table's recovery after a kill -9 left this stage's retry
tiers unread in a test run (Faust's fetch after recovery, see README), and it needs
none. A failure (no answer in 5 s, not 2xx, a refused
address) parks the delivery on the first retry tier and opens that endpoint's
circuit: for 1 s, doubling with each failure in a row up to a minute, its new
deliveries go straight to the tiers without a connection, so a receiver that is
down costs the stage nothing and the other webhooks nothing. Tier ``i`` holds
each delivery for its delay (``MAILFLOW_WEBHOOK_RETRY_SCHEDULE``, 10 s doubling
to 4 h by default) and sends it again, or moves it a tier up; past the last tier
it stays there. The input offset is committed only after every POST of the
record succeeded or its retry record was acknowledged (at least once: a stage
killed in between POSTs again, with the same ``event_id``). The stage fetches in
fuller answers (`streams.faust_compat.BATCHED`): on an idle stack a POST starts at
most 200 ms after its event is written.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import aiohttp
import faust
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult

from mailflow import metrics
from mailflow.config import Settings
from mailflow.webhooks import (
    TOPIC,
    address_allowed,
    allow_private,
    job,
    matches,
    max_age,
    payload,
    retry_schedule,
    sign,
    unseal,
)
from schemas.records import PoisonPill, parse_events
from streams.faust_compat import BATCHED
from streams.runtime import Outputs, Stage
from streams.topics import full_name, group_id

STAGE = "webhooks"
log = logging.getLogger("mailflow.webhooks")
POST_TIMEOUT = 5.0
# A sync of the webhooks topic starts at most every SYNC_GAP seconds: under a steady
# stream every batch of events is newer than the last sync, so each asked for one of
# its own (an offsets request to the broker and a thread hand-off each). Events wait
# up to SYNC_GAP for the next sync, which answers all of them.
SYNC_GAP = 0.05
CIRCUIT_FIRST, CIRCUIT_MAX = 1.0, 60.0


class GuardedResolver(AbstractResolver):
    """DNS for webhook connections that refuses private, loopback and link-local
    addresses (unless allowed): the address checked is the one connected to."""

    def __init__(self, private_ok: bool) -> None:
        from aiohttp.resolver import DefaultResolver

        self._inner = DefaultResolver()
        self.private_ok = private_ok

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        bad = [r["host"] for r in found if not address_allowed(r["host"], self.private_ok)]
        if bad:
            raise OSError(f"{host} resolves to {bad[0]}, which webhooks may not reach")
        return found

    async def close(self) -> None:
        await self._inner.close()


class Circuits:
    """Per endpoint: until when its deliveries skip the connection after failures."""

    def __init__(self) -> None:
        self.state: dict[str, tuple[float, int]] = {}  # hook id -> (open until, failures in a row)

    def is_open(self, hook: str, now: float) -> bool:
        return self.state.get(hook, (0.0, 0))[0] > now

    def failed(self, hook: str, now: float) -> None:
        n = self.state.get(hook, (0.0, 0))[1]
        self.state[hook] = (now + min(CIRCUIT_FIRST * 2 ** n, CIRCUIT_MAX), n + 1)

    def succeeded(self, hook: str) -> None:
        self.state.pop(hook, None)


def register(app: faust.App, settings: Settings) -> Stage:
    stage = Stage(app, settings, STAGE, fetch=BATCHED)  # off the mail's path
    # A retry agent sleeps until its head record is due; a rebalance must not wait
    # for that sleep to end.
    app.conf.stream_wait_empty = False
    schedule = retry_schedule()
    private_ok = allow_private()
    hooks_topic = full_name(settings, TOPIC)
    # synced_at: when the latest sync that read the topic to its end started (0: none yet)
    # last_start: when the latest sync started (for SYNC_GAP)
    state: dict[str, Any] = {"reader": None, "session": None, "synced_at": 0.0, "inflight": None,
                             "last_start": 0.0}
    secrets_cache: dict[tuple[str, str], str] = {}
    circuits = Circuits()

    def reader() -> Any:
        if state["reader"] is None:
            from mailflow.api.auth import SyncReader

            state["reader"] = SyncReader(settings.kafka_bootstrap, [hooks_topic])
        return state["reader"]

    async def hooks(since: float | None = None) -> dict[str, dict[str, Any]]:
        """The registered webhooks, as read by a sync of the webhooks topic that
        started after `since` (an event's time: a webhook registered before the
        event happened is known; by default now). Never a stale first view: an event
        must not miss a webhook only because the stage just started.

        One sync answers every event that happened before it started, so a stage
        that is behind reads the topic's end once per batch, not once per event (a
        thread hand-off and an offsets request each: as much CPU as the sent-folder
        stage, docs/BENCHMARKS.md), and syncs start at most every SYNC_GAP. Concurrent
        callers share the sync in flight."""
        # Never later than now: an event stamped ahead by another host's clock is
        # answered by the next sync, not by syncing until that time comes.
        since = time.time() if since is None else min(since, time.time())
        r = reader()
        while state["synced_at"] <= since:
            inflight = state["inflight"]
            if inflight is None:  # else another caller's sync: it may start late enough
                gap = state["last_start"] + SYNC_GAP - time.time()
                if gap > 0:  # callers arriving meanwhile share the sync started after it
                    await asyncio.sleep(gap)
                    continue
                started = state["last_start"] = time.time()
                inflight = state["inflight"] = (started, asyncio.ensure_future(sync(r, started)))
            started, task = inflight
            # The sync task records its outcome and clears `inflight` before it ends, so
            # a caller that finds it done never loops on it without yielding (that
            # starved the event loop once: every stage of the process stopped).
            if not await asyncio.shield(task) and started > since:
                return _after_failure(r)  # late enough, but it failed
        return dict(r.values[hooks_topic])

    async def sync(r: Any, started: float) -> bool:
        try:
            ok = bool(await asyncio.get_running_loop().run_in_executor(None, r.sync, hooks_topic, 5.0))
            if ok:
                state["synced_at"] = max(state["synced_at"], started)
            return ok
        finally:
            state["inflight"] = None

    def _after_failure(r: Any) -> dict[str, dict[str, Any]]:
        # The topic could not be read to its end: what was read before will do,
        # unless nothing ever was.
        if not state["synced_at"]:
            raise TimeoutError("the webhooks topic could not be read")
        return dict(r.values[hooks_topic])

    def session() -> aiohttp.ClientSession:
        s: aiohttp.ClientSession | None = state["session"]
        if s is None:
            s = state["session"] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=GuardedResolver(private_ok), limit=100,
                                               limit_per_host=8),
                timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT))
        return s

    def secret_of(hook_id: str, hook: dict[str, Any]) -> str:
        k = (hook_id, str(hook.get("secret", "")))
        if k not in secrets_cache:
            secrets_cache[k] = unseal(settings, hook_id, k[1])
        return secrets_cache[k]

    async def post(hook_id: str, hook: dict[str, Any], body: dict[str, Any]) -> str | None:
        """One delivery; None on a 2xx, else why it failed."""
        raw = orjson.dumps(body)
        try:
            headers = {"Content-Type": "application/json", "User-Agent": "mailflow-webhooks/1",
                       "Mailflow-Event-Id": body["event_id"],
                       "Mailflow-Signature": sign(secret_of(hook_id, hook), raw)}
        except Exception as exc:  # a secret sealed under another key: say so, keep it
            return f"secret not readable with this webhook key: {exc!r}"
        try:
            async with session().post(hook["url"], data=raw, headers=headers,
                                      allow_redirects=False) as resp:
                await resp.read()
                ok = 200 <= resp.status < 300
                metrics.STAGE_MESSAGES.labels(STAGE, "posted" if ok else "refused").inc()
                return None if ok else f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            metrics.STAGE_MESSAGES.labels(STAGE, "unreachable").inc()
            return f"{type(exc).__name__}: {exc}"

    async def deliver(hook_id: str, hook: dict[str, Any], body: dict[str, Any], attempt: int,
                      first: float) -> Outputs:
        """Try (unless the endpoint's circuit is open); park it a tier up on failure."""
        out = stage.outputs()
        now = time.time()
        error: str | None
        if circuits.is_open(hook_id, now):
            error = "endpoint failing; not tried"
        else:
            error = await post(hook_id, hook, body)
            if error is None:
                circuits.succeeded(hook_id)
                return out
            circuits.failed(hook_id, time.time())
            log.info("webhook %s: %s; retrying later", hook_id, error)
        now = time.time()
        if now - first > max_age():
            out.park("webhook_expired", "webhook", job(hook_id, body, attempt, first, now, error),
                     body.get("message_id"), detail=error)
            return out
        tier = min(attempt + 1, len(schedule))
        due = now + schedule[tier - 1]
        out.send(f"webhooks.retry.{tier}", hook_id, job(hook_id, body, attempt + 1, first, due, error))
        return out

    async def handle(raw: bytes | None) -> Outputs:
        # A bounce's own events (null sender) are not ours to tell.
        evs = [(ev, ev.sender) for ev in parse_events(raw) if ev.sender]
        out = stage.outputs()
        if not evs:
            return out
        registered = await hooks(max(ev.ts for ev, _ in evs))
        if not any(registered.values()):
            return out
        now = time.time()
        results = await asyncio.gather(*(
            deliver(hid, h, payload(ev, r, sender), 0, now)
            for ev, sender in evs
            for hid, h in registered.items() if h and matches(h, ev.state, sender, ev.ts)
            for r in (ev.recipients or [])))
        for r in results:
            out.extend(r)
        return out

    async def handle_retry(raw: bytes | None) -> Outputs:
        try:
            j = orjson.loads(raw or b"")
            hook_id, body = str(j["hook"]), dict(j["body"])
            attempt, first = int(j["attempt"]), float(j["first"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise PoisonPill("bad_webhook_job", repr(exc)) from None
        hook = (await hooks()).get(hook_id)
        if not hook:
            return stage.outputs()  # deleted since: nobody to tell
        return await deliver(hook_id, hook, body, attempt, first)

    stage.agent("events", handle)
    stage.handlers["webhooks.retry"] = handle_retry

    def retry_agent(tier: int) -> None:
        async def run(stream: faust.StreamT[Any]) -> None:
            async for value in stream:
                # A tier's records fall due in the order they were written: sleeping
                # until the head is due holds back only records due later still.
                try:
                    due = float(orjson.loads(value)["due"])
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    due = 0.0
                await asyncio.sleep(max(0.0, min(due - time.time(), schedule[tier - 1])))
                await stage.process(value, handle_retry)

        app.agent(stage.topic(f"webhooks.retry.{tier}"),
                  name=group_id(settings, STAGE, f"-retry-{tier}"))(run)

    for tier in range(1, len(schedule) + 1):
        retry_agent(tier)
    return stage
