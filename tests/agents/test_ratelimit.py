"""The rate limiter's handler as a function: the count read from the windowed table,
the window write returned; the runtime applies it (its changelog send awaited) before
the next record reads the count."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import faust
import orjson
import pytest

from agents import ratelimit


class _Sent(asyncio.Future):
    message: SimpleNamespace


@pytest.fixture
def changelog(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Faust's own changelog sends (a windowed table's), acknowledged at once."""
    sent: list[tuple] = []

    def send_changelog(self, partition, key, value, *args, **kwargs):
        sent.append((partition, key, value))
        fut = _Sent()
        fut.message = SimpleNamespace(partition=partition)  # as Faust's FutureMessage
        fut.set_result(None)
        return fut

    monkeypatch.setattr(faust.Table, "send_changelog", send_changelog)
    return sent


async def test_the_third_message_in_a_window_of_two_is_rate_limited(app, settings, make_message,
                                                                   producer, changelog,
                                                                   make_event):
    stage = ratelimit.register(app, dataclasses.replace(settings, rate_limit=(2, 60.0)))
    stage._producer = producer  # type: ignore[assignment]
    handle = stage.handlers["submissions"]
    outs = []
    for _ in range(3):
        raw = make_message(sender="s@shop.test").to_json()
        ev = make_event(raw)
        out = await handle(raw, event=ev)
        assert [(k, e, n) for _, k, e, n in out.windows] == [("s@shop.test", ev, 1)]
        await asyncio.gather(*stage.perform(out, ev))  # as the runtime: applied before the next record
        outs.append(out)
    first, second, third = outs
    assert [t for t, _, _, _ in first.records] == ["events", "admitted"]
    assert first.states() == [("accepted", ["bob@x.test"])]
    # The second fills the window: admitted, and the ingress told to answer 429 until its end.
    assert [t for t, _, _, _ in second.records] == ["events", "throttle", "admitted"]
    assert orjson.loads(second.sent("throttle")[0][1])["limit"] == 2
    assert [t for t, _, _, _ in third.records] == ["events", "throttle", "errors", "events"]
    assert [s for s, _ in third.states()] == ["accepted", "rate_limited"]
    assert orjson.loads(third.sent("errors")[0][1])["state"] == "rate_limited"
    # Each count's changelog record sent through the stage's producer (not Faust's),
    # encoded as Faust's changelog topic encodes it, and awaited with the outputs.
    assert changelog == []
    sent = [(k, v, p) for t, k, v, p in producer.acked if t.endswith("sender_counts-changelog")]
    assert [orjson.loads(v) for _, v, _ in sent] == [1, 2, 3]
    key = orjson.loads(sent[0][0])
    assert key[0] == "s@shop.test" and key[1][1] - key[1][0] == pytest.approx(60.0, abs=0.2)  # Faust ends a window 0.1 s early
    assert {p for _, _, p in sent} == {0}  # the input record's partition


async def test_a_message_read_again_keeps_its_first_decision_and_counts_once(
        app, settings, make_message, producer, changelog, make_event):
    stage = ratelimit.register(app, dataclasses.replace(settings, rate_limit=(1, 60.0)))
    stage._producer = producer  # type: ignore[assignment]
    handle = stage.handlers["submissions"]
    raw = make_message(sender="s@shop.test").to_json()
    decisions = []
    for _ in range(2):  # the same record twice, as after a table recovery
        ev = make_event(raw)
        out = await handle(raw, event=ev)
        await asyncio.gather(*stage.perform(out, ev))
        decisions.append((bool(out.sent("admitted")), bool(out.sent("errors")), len(out.windows)))
    assert decisions == [(True, False, 1), (True, False, 0)]  # admitted both times, counted once
    other = make_message(sender="s@shop.test").to_json()  # a second message is over the limit
    ev = make_event(other)
    out = await handle(other, event=ev)
    assert out.sent("errors") and not out.sent("admitted")


def test_decisions_keep_the_latest_ones_only():
    d = ratelimit.Decisions(kept=2)
    d.add("a", (False, False))
    d.add("b", (True, True))
    d.add("c", (False, True))
    assert d.get("a") is None and d.get("b") == (True, True) and d.get("c") == (False, True)


async def test_senders_are_counted_apart(app, settings, make_message, producer, changelog, make_event):
    stage = ratelimit.register(app, dataclasses.replace(settings, rate_limit=(1, 60.0)))
    stage._producer = producer  # type: ignore[assignment]
    handle = stage.handlers["submissions"]
    for sender in ("a@shop.test", "b@shop.test"):
        raw = make_message(sender=sender).to_json()
        ev = make_event(raw)
        out = await handle(raw, event=ev)
        await asyncio.gather(*stage.perform(out, ev))
        assert out.sent("admitted") and not out.sent("errors")
