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
from schemas.records import parse_message


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


def record(make_message, **meta: Any) -> bytes:
    msg = make_message(recipients=["bob@x.test"])
    return msg.with_(meta={"domain": "x.test", **meta}).to_json()


async def test_a_recipient_the_ledger_says_delivered_gets_its_event_and_no_second_send(
        stage, app, make_message):
    raw = record(make_message)
    msg_id = parse_message(raw).id
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
    assert [(k, v["kind"]) for _, k, v, _ in out.writes] == [(f"{parse_message(raw).id}|bob@x.test", DELIVERED)]
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
    assert parse_message(out.sent(HOLD)[0][1]).meta["held_at"] > 0


async def test_expired_mail_bounces_untried_with_a_report_to_the_sender(stage, make_message):
    out = await stage.handlers["delivery"](record(make_message, first_attempt=time.time() - 7200))
    assert FakePool.sent == []
    assert [v["kind"] for _, _, v, _ in out.writes] == [PERMANENT]
    assert [s for s, _ in out.states()] == ["bounced", "accepted"]  # and the DSN's own acceptance
    assert [t for t, _, _, _ in out.records] == ["events", "dead", "events", "delivery"]
    dsn = parse_message(out.sent("delivery")[0][1])
    assert dsn.sender == "" and dsn.recipients == ["alice@shop.test"] and out.sent("delivery")[0][0] == b"shop.test"


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
    assert deliver.serial_key(raw) == f"{parse_message(raw).id}|x.test"
