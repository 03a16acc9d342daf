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
