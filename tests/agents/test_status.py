"""The status stage's pure rule: `suppressed` is a final state like the others."""

from agents.status import FINAL, apply_event
from schemas.records import Event


def test_suppressed_is_final_and_kept() -> None:
    assert "suppressed" in FINAL
    st, done = apply_event(None, Event(id="m", state="accepted", stage="ratelimit", ts=1.0,
                                       recipients=["a@x.test", "b@x.test"], sender="s@shop.test"))
    st, done = apply_event(st, Event(id="m", state="suppressed", stage="deliver", ts=2.0,
                                     recipients=["a@x.test"], detail={"reason": "hard_bounce"}))
    assert done == ["a@x.test"] and not st["final"]
    assert st["recipients"]["a@x.test"]["detail"]["reason"] == "hard_bounce"
    st, done = apply_event(st, Event(id="m", state="delivered", stage="deliver", ts=3.0,
                                     recipients=["a@x.test", "b@x.test"]))
    assert done == ["b@x.test"] and st["final"]
    assert st["recipients"]["a@x.test"]["state"] == "suppressed"  # the first final state wins


async def test_the_handler_writes_each_message_once_per_batch_in_its_events_partition(
        app, settings, make_event) -> None:
    from agents import status

    handle = status.register(app, settings).handlers["events"]

    def ev(state: str, ts: float, msg_id: str = "01m8rvnz585drabdqrcz86dqkt") -> bytes:
        return Event(id=msg_id, state=state, stage="x", ts=ts, recipients=["a@x.test"],
                     sender="s@shop.test").to_json()

    events = [make_event(ev("accepted", 1.0)), make_event(b"not json"),
              make_event(ev("delivered", 2.0)), make_event(ev("accepted", 1.0, "01m8rvnz585drabdqrcz86dqkv"))]
    out = await handle(events)
    assert [(k, v["recipients"]["a@x.test"]["state"], e) for _, k, v, e in out.writes] == [
        ("01m8rvnz585drabdqrcz86dqkt", "delivered", events[2]),
        ("01m8rvnz585drabdqrcz86dqkv", "accepted", events[3])]
    assert [t for t, _, _, _ in out.records] == ["errors"]  # the bad event parked, the rest applied
