"""The webhooks stage's routing, its handler called with a stand-in for the webhooks
topic: which events become POSTs, and what a failed POST leaves (a retry-tier record,
or a parked one past the maximum age); the POSTs themselves are tested against a
real receiver in tests/pipeline/test_citizen.py."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from agents import webhooks
from schemas.records import Event, PoisonPill

HOOK = {"url": "http://127.0.0.1:1/hook", "events": ["delivered"], "created_at": 0,
        "owner": "k1", "scope": {"kind": "key", "domains": ["shop.test"]}, "secret": "x"}


class FakeReader:
    hooks: dict[str, Any] = {}
    syncs: list[float] = []  # when each sync of the webhooks topic was made

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.values = {t: FakeReader.hooks for t in topics}

    def sync(self, topic: str, *args: object) -> bool:
        FakeReader.syncs.append(time.time())
        return True


@pytest.fixture
def stage(app, settings, monkeypatch):
    import mailflow.api.auth

    monkeypatch.setattr(mailflow.api.auth, "SyncReader", FakeReader)
    monkeypatch.setattr(FakeReader, "hooks", {"h1": HOOK})
    monkeypatch.setattr(FakeReader, "syncs", [])
    return webhooks.register(app, settings)


def event(state: str = "delivered", sender: str | None = "alice@shop.test",
          ts: float | None = None) -> bytes:
    return Event(id="01m8rvnz585drabdqrcz86dqkt", state=state, stage="deliver",
                 ts=time.time() if ts is None else ts, recipients=["bob@x.test"],
                 sender=sender).to_json()


async def test_a_failed_post_goes_to_the_first_retry_tier_and_opens_the_circuit(stage):
    out = await stage.handlers["events"](event())
    (key, value), = out.sent("webhooks.retry.1")
    job = orjson.loads(value)
    assert key == b"h1" and job["attempt"] == 1 and job["body"]["recipient"] == "bob@x.test"
    again = await stage.handlers["events"](event())  # the circuit is open: no connection tried
    assert orjson.loads(again.sent("webhooks.retry.1")[0][1])["error"] == "endpoint failing; not tried"


async def test_events_no_webhook_asked_for_produce_nothing(stage):
    assert (await stage.handlers["events"](event(state="scanned"))).records == []
    assert (await stage.handlers["events"](event(sender=None))).records == []  # a bounce's own
    assert (await stage.handlers["events"](event(sender="eve@other.test"))).records == []  # not the key's


async def test_a_retry_past_the_maximum_age_is_parked(stage):
    body = {"event_id": "e1", "message_id": "01m8rvnz585drabdqrcz86dqkt", "recipient": "bob@x.test"}
    job = orjson.dumps({"hook": "h1", "body": body, "attempt": 3, "first": 0.0, "due": 0.0})
    out = await stage.handlers["webhooks.retry"](job)
    parked = orjson.loads(out.sent("errors")[0][1])
    assert (parked["reason"], parked["state"], parked["id"]) == ("webhook_expired", "webhook", body["message_id"])


async def test_a_retry_for_a_deleted_webhook_is_dropped_and_a_bad_job_is_poison(stage):
    FakeReader.hooks.clear()
    job = orjson.dumps({"hook": "h1", "body": {}, "attempt": 1, "first": time.time(), "due": 0.0})
    assert (await stage.handlers["webhooks.retry"](job)).records == []
    with pytest.raises(PoisonPill):
        await stage.handlers["webhooks.retry"](b"{}")



async def test_one_sync_of_the_webhooks_topic_answers_every_event_that_happened_before_it(stage):
    # A stage that is behind: these events happened before the first sync started.
    past = time.time() - 5
    for _ in range(5):
        await stage.handlers["events"](event(state="scanned", ts=past))
    assert len(FakeReader.syncs) == 1
    # An event that happened after that sync started needs a sync of its own: a
    # webhook registered just before it must be known.
    await stage.handlers["events"](event(state="scanned", ts=time.time() + 0.01))
    assert len(FakeReader.syncs) == 2


@pytest.mark.timeout(30)  # the bug this guards against spun the event loop for ever
async def test_a_caller_arriving_as_a_sync_ends_waits_for_a_sync_of_its_own(stage, monkeypatch):
    # A retry record handled in the instant between a sync's end and its caller's
    # resumption once found the finished sync still "in flight" and looped on it
    # without yielding: the process's event loop stopped, and every stage in it.
    import asyncio

    loop = asyncio.get_running_loop()
    late: list[asyncio.Task[Any]] = []

    def run_in_executor(executor: object, fn: Any, *args: Any) -> asyncio.Future[Any]:
        # The sync "in a thread", ended from the loop: the late caller's first step is
        # scheduled just before the sync's result wakes its caller.
        fut: asyncio.Future[Any] = loop.create_future()

        def end() -> None:
            if not late:
                late.append(loop.create_task(stage.handlers["webhooks.retry"](orjson.dumps(
                    {"hook": "gone", "body": {}, "attempt": 1, "first": time.time(), "due": 0.0}))))
            fut.set_result(fn(*args))

        loop.call_later(0.01, end)
        return fut

    monkeypatch.setattr(loop, "run_in_executor", run_in_executor)
    await stage.handlers["events"](event(state="scanned", ts=time.time() - 5))
    assert (await asyncio.wait_for(late[0], 10)).records == []  # its hook is gone: nothing to do
    assert len(FakeReader.syncs) == 2  # it did not take the earlier sync for its own


async def test_syncs_start_at_most_every_sync_gap_and_concurrent_events_share_one(stage):
    # A steady stream: each batch's events are newer than the last sync. Batches
    # one after another each wait for a sync of their own, at most one per SYNC_GAP;
    # a batch's events, handled concurrently, share it.
    import asyncio

    for _ in range(3):
        await asyncio.gather(*(stage.handlers["events"](event(state="scanned")) for _ in range(10)))
    gaps = [b - a for a, b in zip(FakeReader.syncs, FakeReader.syncs[1:], strict=False)]
    assert len(FakeReader.syncs) == 3
    assert min(gaps) >= webhooks.SYNC_GAP * 0.9  # time.time()'s resolution, not a shorter gap
