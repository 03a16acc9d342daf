"""Pure decisions of the stages: the rate window and the status state machine."""

from agents.ratelimit import over_limit, should_throttle, window_bounds
from agents.status import apply_event, view_of
from schemas.records import Event


def test_rate_window():
    assert window_bounds(125.0, 60.0) == (120.0, 180.0)
    assert window_bounds(120.0, 60.0) == (120.0, 180.0)
    assert not over_limit(3, 3) and over_limit(4, 3)
    assert not should_throttle(2, 3) and should_throttle(3, 3)


def ev(state, rcpts=None, ts=1.0, **detail):
    return Event(id="m1", state=state, stage="t", ts=ts, recipients=rcpts, detail=detail)


def test_each_recipient_reaches_one_final_state():
    st, fin = apply_event(None, ev("accepted", ["a@x", "b@y"], 1.0))
    assert fin == [] and not st["final"]
    st, fin = apply_event(st, ev("stored", ["a@x"], 2.0))
    assert fin == ["a@x"]
    st, _ = apply_event(st, ev("validated", ["b@y"], 1.5))
    st, fin = apply_event(st, ev("delivered", ["b@y"], 3.0, reply="250 ok"))
    assert fin == ["b@y"] and st["final"]
    # a replayed or conflicting final event changes nothing but the timeline
    st, fin = apply_event(st, ev("bounced", ["b@y"], 4.0))
    assert fin == [] and st["recipients"]["b@y"]["state"] == "delivered"
    n = len(st["timeline"])
    st, _ = apply_event(st, ev("bounced", ["b@y"], 4.0))
    assert len(st["timeline"]) == n  # the same event twice is recorded once
    assert [e["ts"] for e in st["timeline"]] == sorted(e["ts"] for e in st["timeline"])


def test_states_only_move_forward_and_show_what_they_wait_on():
    st, _ = apply_event(None, ev("accepted", ["a@x"], 1.0))
    st, _ = apply_event(st, ev("sent_folder", ["a@x"], 3.0))
    st, _ = apply_event(st, ev("scanned", ["a@x"], 2.0))  # arrived late
    assert st["recipients"]["a@x"]["state"] == "sent_folder"
    v = view_of(st)
    assert v["recipients"]["a@x"]["waiting_on"].startswith("deliver")
    assert v["state"] == "sent_folder"


def test_event_for_all_recipients():
    st, _ = apply_event(None, ev("accepted", ["a@x", "b@y"]))
    st, fin = apply_event(st, ev("rejected", None, 2.0, reason="bad_from_header"))
    assert sorted(fin) == ["a@x", "b@y"] and st["final"]


def test_replay_reopens_a_final_recipient_once():
    st, _ = apply_event(None, ev("accepted", ["a@x"], 1.0))
    st, _ = apply_event(st, ev("bounced", ["a@x"], 2.0))
    st, _ = apply_event(st, ev("replayed", ["a@x"], 3.0))
    assert st["recipients"]["a@x"]["state"] == "replayed" and not st["final"]
    st, fin = apply_event(st, ev("delivered", ["a@x"], 4.0))
    assert fin == ["a@x"] and st["recipients"]["a@x"]["state"] == "delivered"
