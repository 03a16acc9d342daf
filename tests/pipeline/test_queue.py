"""`mailflow queue` on the real pipeline: hold, release, flush and bounce, across kill -9.

One module stack (every stage, scanning off) whose retry schedule is ``1h,2h``:
a deferred message waits an hour unless something makes it go. Each destination
domain has its own scripted SMTP peer (a real aiosmtpd server on loopback), so a
test can count the attempts each domain got.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import murmur2
from harness import (
    ROOT,
    ScriptedPeer,
    Stack,
    dsn_report,
    find_dsn,
    http,
    produce_submission,
    producer,
    raw_mail,
    submit_raw,
    timeline,
    wait_for,
)

from mailflow.ids import new_id

ALL_STAGES = ["ratelimit", "validate", "store", "scan", "sentfolder", "deliver", "retry", "status"]
PARTITIONS = 4
SENDER = "queue@mailflow.test"  # local: its bounces land in its inbox


def partition_of(domain: str) -> int:
    """The partition of `domain` on ``delivery`` and the retry topics (Kafka's murmur2)."""
    return (murmur2(domain.encode()) & 0x7FFFFFFF) % PARTITIONS


def same_partition(domain: str, stem: str) -> str:
    """A domain named `stem`N.test on the same partition as `domain`."""
    return next(d for i in range(1000) if partition_of(d := f"{stem}{i}.test") == partition_of(domain))


HELD, HELD_ID = "held.test", "byid.test"
FREE = same_partition(HELD, "free")  # shares the held domain's partitions
KEPT, FREED = "kept.test", "freed.test"  # held across the kill; released while the stages are down
FLUSHED = "flushed.test"
AHEAD = same_partition(FLUSHED, "ahead")  # deferred before FLUSHED on the same tier partition
BOUNCED = "bounced.test"
DOMAINS = [HELD, HELD_ID, FREE, KEPT, FREED, FLUSHED, AHEAD, BOUNCED]


@pytest.fixture(scope="module")
def peers() -> Iterator[dict[str, ScriptedPeer]]:
    # A 451 to the first transaction: the deferred mail of the flush and bounce cases.
    ps = {d: ScriptedPeer(fail_first=1 if d in (FLUSHED, AHEAD, BOUNCED) else 0) for d in DOMAINS}
    for p in ps.values():
        p.start()
    try:
        yield ps
    finally:
        for p in ps.values():
            p.stop()


@pytest.fixture(scope="module")
def qstack(kafka: str, work_dir: Path, peers: dict[str, ScriptedPeer]) -> Iterator[Stack]:
    routes = ",".join(f"{d}=127.0.0.1:{p.port}" for d, p in peers.items())
    stack = Stack(work_dir, kafka, smtp_routes=routes, retry_schedule="1h,2h", scanners="none",
                  rate_limit="100000/60s", partitions=str(PARTITIONS), smtp_timeout="10s")
    try:
        yield stack.start(ALL_STAGES)
    finally:
        stack.stop()


def queue(stack: Stack, *args: str) -> dict[str, Any]:
    """`mailflow queue ARGS`: the JSON line it ends with."""
    out = subprocess.run([sys.executable, "-m", "mailflow.ops.cli", "queue", *args], env=stack.env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return orjson.loads(out.stdout.strip().splitlines()[-1])


def state(stack: Stack, msg_id: str, rcpt: str) -> str | None:
    st = stack.status(msg_id)
    return st["recipients"].get(rcpt, {}).get("state") if st else None


def mail(stack: Stack, domain: str, tag: str) -> tuple[str, str]:
    """Submit one message to u@`domain` through the API: (id, Message-ID)."""
    mid = f"<{tag}.{time.time_ns()}@t.test>"
    return submit_raw(stack, raw_mail(SENDER, f"u@{domain}", tag, mid)), mid


def deferred_an_hour(stack: Stack, msg_id: str, rcpt: str) -> bool:
    ev = timeline(stack, msg_id, "deferred") if state(stack, msg_id, rcpt) == "deferred" else []
    return bool(ev) and ev[-1]["detail"]["next_attempt_at"] - ev[-1]["ts"] == pytest.approx(3600, abs=1)


# Holds are read by the deliver stage from queue.control within a second of being written.
TAKES_EFFECT = 1.5


def test_held_domain_and_message_wait_without_attempts_and_go_once_after_release(qstack: Stack, peers):
    s = qstack
    assert queue(s, "hold", HELD)["domain"] == HELD
    by_id = new_id()  # a real id: the API answers 400 for anything else
    assert queue(s, "hold", "--id", by_id)["id"] == by_id
    time.sleep(TAKES_EFFECT)
    held_id, held_mid = mail(s, HELD, "held")
    free_id, free_mid = mail(s, FREE, "free")  # same partition as the held domain
    p = producer(s)
    id_mid = f"<byid.{time.time_ns()}@t.test>"
    produce_submission(p, s, SENDER, [f"u@{HELD_ID}"], raw_mail(SENDER, f"u@{HELD_ID}", "by id", id_mid), by_id)
    assert p.flush(30) == 0

    wait_for(lambda: state(s, held_id, f"u@{HELD}") == "held", 90, what="the held state")
    wait_for(lambda: state(s, by_id, f"u@{HELD_ID}") == "held", 90, what="the held state (by id)")
    wait_for(lambda: state(s, free_id, f"u@{FREE}") == "delivered", 60, what="the free domain's delivery")
    assert len(peers[FREE].with_id(free_mid)) == 1
    st = s.status(held_id)
    assert st["recipients"][f"u@{HELD}"]["waiting_on"].startswith("an operator's release")
    assert [e["detail"]["hold"] for e in timeline(s, held_id, "held")] == ["domain"]
    assert not timeline(s, held_id, "deferred")  # no attempt spent

    shown = queue(s, "show", "--json")
    assert shown["queues"]["held"]["domains"][HELD]["total"] == 1
    assert shown["queues"]["held"]["domains"][HELD_ID]["ages"]["0-5m"] == 1
    assert shown["stages"]["retry"]["total"] >= 2  # held mail is the retry stage's lag
    assert {(h["kind"], h["value"]) for h in shown["holds"]} >= {("domain", HELD), ("id", by_id)}
    code, doc, _ = http("GET", f"{s.api}/v1/queue")
    assert code == 200 and doc["queues"]["held"]["domains"][HELD]["total"] == 1
    from mailflow.api.auth import create_key

    user_key = create_key(s.settings(), ["mailflow.test"], name="not admin")[0]
    code, doc, _ = http("GET", f"{s.api}/v1/queue", auth=user_key)
    assert code == 403 and doc["error"]["code"] == "forbidden"
    assert http("GET", f"{s.api}/v1/queue", auth=None)[0] == 401

    # The deliver stage has finished every record it was given, the held ones too:
    # one it had tried instead of holding would have reached its peer.
    s.caught_up("deliver")
    assert peers[HELD].transactions == 0 and peers[HELD_ID].transactions == 0
    assert queue(s, "release", HELD)["was_held"] is True
    assert queue(s, "release", "--id", by_id)["was_held"] is True
    wait_for(lambda: state(s, held_id, f"u@{HELD}") == "delivered", 60, what="delivery after the release")
    wait_for(lambda: state(s, by_id, f"u@{HELD_ID}") == "delivered", 60, what="delivery after the release (id)")
    # Released mail comes back from retry.hold through the retry stage: once it has
    # committed past every held record, any second forward is on `delivery` (same
    # key: the domain) ahead of the markers.
    s.caught_up("retry", ("retry.hold",))
    s.wait_markers([(peers[HELD], s.send_marker(SENDER, HELD)),
                    (peers[HELD_ID], s.send_marker(SENDER, HELD_ID))])
    # the message, then the marker
    assert len(peers[HELD].with_id(held_mid)) == 1 and peers[HELD].transactions == 2
    assert len(peers[HELD_ID].with_id(id_mid)) == 1
    wait_for(lambda: queue(s, "show", "--json")["queues"]["held"]["total"] == 0, 30, interval=1,
             what="the held queue empty")


def restart(stack: Stack, stage: str) -> None:
    """Start `stage` again and wait until the new replica has registered."""
    proc = stack.start_stage(stage)
    wait_for(lambda: any(v.get("pid") == proc.pid for v in stack.registry().values()), 120, interval=1,
             what=f"the restarted {stage} stage")


def test_hold_release_flush_and_bounce_survive_kill_9_of_deliver_and_retry(qstack: Stack, peers):
    s = qstack
    queue(s, "hold", KEPT)
    queue(s, "hold", FREED)
    time.sleep(TAKES_EFFECT)
    kept_id, kept_mid = mail(s, KEPT, "kept")
    freed_id, freed_mid = mail(s, FREED, "freed")
    ahead_id, _ = mail(s, AHEAD, "ahead")
    wait_for(lambda: deferred_an_hour(s, ahead_id, f"u@{AHEAD}"), 60, what="the first deferral")
    flushed_id, flushed_mid = mail(s, FLUSHED, "flushed")  # behind AHEAD's on the same tier partition
    bounced_id, bounced_mid = mail(s, BOUNCED, "bounced")
    for msg_id, domain in [(flushed_id, FLUSHED), (bounced_id, BOUNCED)]:
        wait_for(lambda m=msg_id, d=domain: deferred_an_hour(s, m, f"u@{d}"), 60, what=f"{domain} deferred")
    for msg_id, domain in [(kept_id, KEPT), (freed_id, FREED)]:
        wait_for(lambda m=msg_id, d=domain: state(s, m, f"u@{d}") == "held", 60, what=f"{domain} held")

    # Everything on `delivery` committed first: a kill -9 replays what was not, and a
    # replayed first attempt would be tried again whatever the queue actions say.
    wait_for(lambda: queue(s, "show", "--json")["stages"]["deliver"]["total"] == 0, 60, interval=1,
             what="the deliver stage's commits")
    s.kill("deliver", signal.SIGKILL)
    s.kill("retry", signal.SIGKILL)
    # While both are down: each action is only a record on queue.control.
    assert queue(s, "release", FREED)["was_held"] is True
    assert queue(s, "flush", FLUSHED)["domain"] == FLUSHED
    assert queue(s, "bounce", "--id", bounced_id)["id"] == bounced_id
    restart(s, "deliver")
    restart(s, "retry")

    wait_for(lambda: state(s, freed_id, f"u@{FREED}") == "delivered", 90, what="the release after the restart")
    wait_for(lambda: state(s, flushed_id, f"u@{FLUSHED}") == "delivered", 90, what="the flush after the restart")
    wait_for(lambda: state(s, bounced_id, f"u@{BOUNCED}") == "bounced", 90, what="the bounce after the restart")
    r = s.status(bounced_id)["recipients"][f"u@{BOUNCED}"]
    assert r["detail"]["reason"] == "operator", r
    blocks, returned = dsn_report(find_dsn(s, SENDER, bounced_mid))  # RFC 3464, to the sender's inbox
    assert blocks[0]["Final-Recipient"] == f"rfc822; u@{BOUNCED}"
    assert blocks[0]["Action"] == "failed" and blocks[0]["Status"] == "5.0.0"
    assert f"Message-ID: {bounced_mid}" in returned

    # The hold made before the kill is still in force, for new mail too.
    late_id, late_mid = mail(s, KEPT, "kept-late")
    wait_for(lambda: state(s, late_id, f"u@{KEPT}") == "held", 60, what="new mail held after the restart")
    assert state(s, kept_id, f"u@{KEPT}") == "held"
    assert state(s, ahead_id, f"u@{AHEAD}") == "deferred", s.status(ahead_id)  # only the flushed domain went
    shown = queue(s, "show", "--json")
    assert shown["queues"]["held"]["domains"][KEPT]["total"] == 2
    # the flushed and bounced records still sit on their tier, behind AHEAD's: sent already, not shown
    assert set(shown["queues"]["deferred"]["domains"]) == {AHEAD}
    assert peers[KEPT].transactions == 0
    assert peers[BOUNCED].transactions == 1 and peers[AHEAD].transactions == 1  # no attempt since

    queue(s, "release", KEPT)
    for msg_id in (kept_id, late_id):
        wait_for(lambda m=msg_id: state(s, m, f"u@{KEPT}") == "delivered", 60, what="delivery after the release")
    # Held mail comes back through the retry stage: once it has committed past every
    # record on retry.hold, a second forward is on `delivery` ahead of the markers.
    # The flushed record itself still sits on retry.1 behind AHEAD's, due in an hour:
    # forwarded once by the flush, it is committed past without a second forward when
    # the head reaches it (agents/retry.py, `covered`); no bounded wait covers that.
    s.caught_up("retry", ("retry.hold",))
    s.wait_markers([(peers[d], s.send_marker(SENDER, d)) for d in (KEPT, FREED, FLUSHED)])
    for peer, mid in [(peers[KEPT], kept_mid), (peers[KEPT], late_mid), (peers[FREED], freed_mid),
                      (peers[FLUSHED], flushed_mid)]:
        assert len(peer.with_id(mid)) == 1, mid
    assert peers[FLUSHED].transactions == 3  # the 451, then the flushed attempt, then the marker
