"""The deliver stage's decisions, its handler called with stand-ins for SMTP, the
queue controls and the suppression list: what the ledger, a suppression, a hold
and the queue age make of a record, asserted as the Outputs it returns."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import orjson
import pytest

from agents import deliver
from mailflow.config import parse_routes
from mailflow.ops.queue import HOLD, Controls
from mailflow.rules.delivery import DELIVERED, PERMANENT, Outcome
from mailflow.suppression import TOPIC as SUPPRESSIONS
from schemas.mail import Delivery, RetryState, parse_delivery, parse_submission


class FakeControl:
    now = Controls()

    def __init__(self, settings: object) -> None:
        self.ready = threading.Event()
        self.ready.set()

    def controls(self) -> Controls:
        return FakeControl.now


class FakeSuppressions:
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    remembered: list[tuple[dict[str, Any], int, int]] = []

    def __init__(self, settings: object) -> None:
        pass

    async def ready(self) -> None:
        return None

    def get(self, domain: str, address: str) -> dict[str, Any] | None:
        return FakeSuppressions.entries.get((domain, address))

    def remember(self, rec: dict[str, Any], partition: int, offset: int) -> None:
        FakeSuppressions.remembered.append((rec, partition, offset))


class FakePool:
    """SMTP: answers each transaction with `reply` per recipient, and keeps them."""

    reply = (DELIVERED, 250, "250 2.0.0 queued")
    sent: list[list[str]] = []

    def __init__(self, **kw: object) -> None:
        pass

    async def send(self, host: str, port: int, sender: str, rcpts: list[str], body: bytes,
                   **kw: object) -> list[Outcome]:
        FakePool.sent.append(list(rcpts))
        kind, code, reply = FakePool.reply
        return [Outcome(r, kind, code, reply, host) for r in rcpts]


@pytest.fixture
def stage(app, settings, monkeypatch, producer, one_partition):
    monkeypatch.setattr(deliver, "ControlView", FakeControl)
    monkeypatch.setattr(deliver, "SuppressionList", FakeSuppressions)
    monkeypatch.setattr(deliver, "Pool", FakePool)
    monkeypatch.setattr(FakeControl, "now", Controls())
    monkeypatch.setattr(FakeSuppressions, "entries", {})
    monkeypatch.setattr(FakeSuppressions, "remembered", [])
    monkeypatch.setattr(FakePool, "sent", [])
    s = deliver.register(app, dataclasses.replace(
        settings, smtp_routes=parse_routes("*=127.0.0.1:2525"), mta_sts=False, max_queue_age=3600.0))
    s._producer = producer
    one_partition(app.tables["ledger"])
    return s


def record(make_message, **retry: Any) -> bytes:
    """A ``delivery`` record for bob@x.test, with `retry` (`RetryState` fields)."""
    msg = make_message(kind=Delivery, recipients=["bob@x.test"], domain="x.test",
                       retry=RetryState(**retry))
    return msg.to_json()


async def test_a_recipient_the_ledger_says_delivered_gets_its_event_and_no_second_send(
        stage, app, make_message):
    raw = record(make_message)
    msg_id = parse_delivery(raw).id
    app.tables["ledger"].data[f"{msg_id}|bob@x.test"] = {"kind": DELIVERED, "reply": "250 ok", "ts": 1.0}
    out = await stage.handlers["delivery"](raw)
    assert FakePool.sent == [] and out.writes == []
    assert out.states() == [("delivered", ["bob@x.test"])]
    assert "not sent again" in orjson.loads(out.sent("events")[0][1])["detail"]["note"]


async def test_a_delivery_writes_the_ledger_entry_first_and_a_second_copy_finds_it(
        stage, app, make_message):
    raw = record(make_message)
    out = await stage.handlers["delivery"](raw)
    assert FakePool.sent == [["bob@x.test"]]
    assert [(k, v["kind"]) for _, k, v, _ in out.writes] == [(f"{parse_delivery(raw).id}|bob@x.test", DELIVERED)]
    assert out.states() == [("delivered", ["bob@x.test"])]
    await asyncio.gather(*stage.perform(out))  # as the runtime: the entry applied and acknowledged
    again = await stage.handlers["delivery"](raw)  # a copy of the record
    assert FakePool.sent == [["bob@x.test"]] and again.writes == []
    assert again.states() == [("delivered", ["bob@x.test"])]


async def test_a_suppressed_recipient_is_never_attempted(stage, make_message):
    FakeSuppressions.entries[("shop.test", "bob@x.test")] = {"reason": "unsubscribe", "ts": 1.0}
    out = await stage.handlers["delivery"](record(make_message))
    assert FakePool.sent == [] and out.writes == []
    assert out.states() == [("suppressed", ["bob@x.test"])]


async def test_a_held_domain_goes_to_the_hold_topic_untried(stage, make_message):
    FakeControl.now = Controls(holds={"domain|x.test": {"domain": "x.test", "since": 5.0}})
    out = await stage.handlers["delivery"](record(make_message))
    assert FakePool.sent == []
    assert [t for t, _, _, _ in out.records] == ["events", HOLD]
    assert out.states() == [("held", ["bob@x.test"])]
    held = parse_delivery(out.sent(HOLD)[0][1])
    assert held.retry.held_at and held.retry.held_at > 0 and held.domain == "x.test"
    assert held.retry.with_(held_at=None) == RetryState()  # no attempt spent


async def test_expired_mail_bounces_untried_with_a_report_to_the_sender(stage, make_message):
    out = await stage.handlers["delivery"](record(make_message, first_attempt=time.time() - 7200))
    assert FakePool.sent == []
    assert [v["kind"] for _, _, v, _ in out.writes] == [PERMANENT]
    assert [s for s, _ in out.states()] == ["bounced", "accepted"]  # and the DSN's own acceptance
    assert [t for t, _, _, _ in out.records] == ["events", "dead", "events", "delivery"]
    dsn = parse_delivery(out.sent("delivery")[0][1])
    assert dsn.sender == "" and dsn.recipients == ["alice@shop.test"] and out.sent("delivery")[0][0] == b"shop.test"
    assert (dsn.bounce, dsn.bounce_of, dsn.domain, dsn.source) == (True, parse_delivery(out.sent("dead")[0][1]).id,
                                                                    "shop.test", "bounce")
    dead = parse_delivery(out.sent("dead")[0][1])
    assert dead.retry.dead is not None and dead.retry.dead.reason == "expired"
    assert [f["recipient"] for f in dead.retry.dead.failed] == ["bob@x.test"]
    assert dead.retry.history and "failed" in dead.retry.history[-1]


async def test_a_hard_bounce_suppresses_the_recipient_once_the_broker_took_it(stage, make_message):
    FakePool.reply = (PERMANENT, 550, "550 5.1.1 no such user")
    try:
        raw = record(make_message)
        out = await stage.handlers["delivery"](raw)
    finally:
        FakePool.reply = (DELIVERED, 250, "250 2.0.0 queued")
    (key, value), = out.sent(SUPPRESSIONS)
    assert key == b"shop.test|bob@x.test" and orjson.loads(value)["reason"] == "hard_bounce"
    assert FakeSuppressions.remembered == []  # not before the ack
    await asyncio.gather(*stage.perform(out))
    await asyncio.sleep(0)
    assert [r["address"] for r, _, _ in FakeSuppressions.remembered] == ["bob@x.test"]


def test_copies_of_one_message_and_domain_share_a_serial_key(make_message):
    raw = record(make_message)
    assert deliver.serial_key(raw) == f"{parse_delivery(raw).id}|x.test"


async def test_a_temporary_failure_goes_to_the_first_tier_with_its_retry_state(stage, make_message):
    FakePool.reply = ("temporary", 451, "451 4.3.0 try later")
    try:
        first = time.time() - 60
        raw = record(make_message, attempt=1, first_attempt=first,
                     history=[{"ts": first, "attempt": 1, "error": "451 earlier"}])
        out = await stage.handlers["delivery"](raw)
    finally:
        FakePool.reply = (DELIVERED, 250, "250 2.0.0 queued")
    assert out.writes == [] and out.states() == [("deferred", ["bob@x.test"])]
    (topic, key, value, _), = [r for r in out.records if r[0] != "events"]
    rec = parse_delivery(value)
    assert (topic, key) == ("retry.2", b"x.test")  # the second attempt failed: the second tier
    r = rec.retry
    assert (r.attempt, r.first_attempt, r.last_error, r.tier) == (2, first, "451 4.3.0 try later", 2)
    assert r.due is not None and r.due > time.time()
    assert [h["error"] for h in r.history or []] == ["451 earlier", "451 4.3.0 try later"]
    assert rec.with_(retry=RetryState()) == parse_delivery(raw).with_(retry=RetryState())  # the rest as it came


async def test_a_local_senders_bounce_goes_to_admitted_as_a_submission(stage, make_message):
    FakePool.reply = (PERMANENT, 550, "550 5.1.1 no such user")
    try:
        msg = make_message(kind=Delivery, sender="alice@mailflow.local", recipients=["bob@x.test"],
                           domain="x.test")
        out = await stage.handlers["delivery"](msg.to_json())
    finally:
        FakePool.reply = (DELIVERED, 250, "250 2.0.0 queued")
    assert [t for t, _, _, _ in out.records if t != "events"] == [SUPPRESSIONS, "dead", "admitted"]
    (key, value), = out.sent("admitted")
    dsn = parse_submission(value)
    assert key == b"" and (dsn.sender, dsn.recipients, dsn.bounce, dsn.bounce_of) == (
        "", ["alice@mailflow.local"], True, msg.id)
    dead = parse_delivery(out.sent("dead")[0][1])
    assert dead.retry.dead is not None and dead.retry.dead.reason == "permanent"


def test_a_record_the_serial_key_cannot_read_takes_no_lock():
    assert deliver.serial_key(b"not json") is None and deliver.serial_key(b'{"id": "A"}') is None
    assert deliver.serial_key(b'{"id": "A", "recipients": ["b@X.Test"]}') == "A|x.test"
