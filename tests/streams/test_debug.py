"""`GET /debug/consumer` on a running stage (streams/debug.py), on the real broker."""

from __future__ import annotations

from harness import Stack, http, wait_for


def test_a_stage_reports_its_partitions_feeds_and_tasks(submission_stack: Stack) -> None:
    s = submission_stack
    code, doc, _ = s.submit({"from": "dbg@remote.test", "to": ["debug@mailflow.test"],
                             "subject": "debug", "text": "hello"})
    assert code == 202, doc
    # The latest store replica heard from: the session's stack may have had others
    # (a test kills the store and starts another).
    url = max((v for v in s.registry().values() if v.get("stage") == "store"),
              key=lambda v: float(v["ts"]))["url"]

    def state() -> dict | None:
        code, body, _ = http("GET", url.rstrip("/") + "/debug/consumer")
        assert code == 200, body
        local = [p for p in body["partitions"] if p["topic"] == f"{s.prefix}local"]
        done = sum(p["committed"] or 0 for p in local) >= 1 and not any(p["in_flight"] for p in local)
        return body if done else None

    body = wait_for(state, 60, what="the store to commit the message")
    assert body["rebalancing"] is False and body["flow_active"] is True
    local = [p for p in body["partitions"] if p["topic"] == f"{s.prefix}local"]
    assert len(local) == 4 and all(p["active"] and not p["paused"] for p in local)
    assert all(isinstance(p["position"], int) for p in local)
    # refetch_holes' own read of aiokafka's state agrees with the consumer's answer.
    assert [p["fetch_position"] for p in local] == [p["position"] for p in local]
    assert len(body["feeds"]) == 1 and body["feeds"][0]["buffered"] == 0
    assert body["feeds"][0]["waiting"] is True  # for its next batch
    assert any("Fetcher._fetcher > _drain_messages_eagerly" in t for t in body["tasks"]), body["tasks"]
