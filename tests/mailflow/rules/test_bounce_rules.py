"""The reply rule table: classes, retry or bounce, suppression, rate-limit pauses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailflow.rules.bounce_rules import (
    MAX_SLOW,
    DestinationBackoff,
    classify,
    load_rules,
    reply_parts,
    rule_from_dict,
)


@pytest.mark.parametrize("code,reply,klass,retry,suppress", [
    (550, "550 5.1.1 <a@x.test>: no such user", "hard", False, True),
    (550, "550 5.1.2 bad destination system", "hard", False, True),
    (None, "5.1.10 null MX: the domain accepts no mail", "hard", False, True),
    (550, "550 5.2.1 mailbox disabled", "hard", False, True),
    (550, "550 5.7.1 relaying denied", "policy", False, False),
    (554, "554 5.7.1 user unknown (policy text must not suppress)", "policy", False, False),
    (451, "451 4.7.1 greylisted", "policy", True, False),
    (552, "552 5.2.2 mailbox full", "mailbox_full", False, False),
    (452, "452 4.2.2 over quota", "mailbox_full", True, False),
    (550, "550 Requested action not taken: mailbox full", "mailbox_full", False, False),
    (421, "421 4.7.28 Gmail has detected an unusual rate of unsolicited mail", "rate_limited", True, False),
    (451, "451 4.7.650 The mail server has been temporarily rate limited", "rate_limited", True, False),
    (421, "421 4.7.0 [TS01] Messages from 1.2.3.4 temporarily deferred", "rate_limited", True, False),
    (451, "451 4.3.0 try later", "soft", True, False),
    (None, "connection to mx:25 failed: refused", "soft", True, False),
    (550, "550 no such user here", "hard", False, True),
    (554, "554 transaction failed", "hard", False, False),
    (552, "552 5.3.4 message exceeds the SIZE limit", "hard", False, False),
])
def test_default_table(code: int | None, reply: str, klass: str, retry: bool, suppress: bool) -> None:
    v = classify(code, reply, permanent=bool(code and code >= 500) or reply.startswith("5."))
    assert (v.klass, v.retry, v.suppress) == (klass, retry, suppress), v
    assert (v.slow > 0) == (klass == "rate_limited")


def test_wrapped_reply_still_read() -> None:
    # smtp.py reports a 421 at DATA as a disconnect, with the reply inside.
    assert reply_parts(None, "mx.test disconnected: 421 4.7.28 slow down") == (421, "4.7.28")
    assert classify(None, "mx.test disconnected: 421 4.7.28 slow down", False).klass == "rate_limited"


def test_no_reply_follows_the_transport() -> None:
    assert classify(None, "no MX", permanent=True).retry is False
    assert classify(None, "timeout", permanent=False).retry is True


def test_operator_rules_come_first(tmp_path: Path) -> None:
    f = tmp_path / "rules.json"
    f.write_text(json.dumps([
        {"status": "5.7.1", "text": "spamhaus", "class": "policy", "retry": True, "name": "listed"},
        {"code": "550", "text": "gone away", "class": "hard", "suppress": True},
        {"status": "4.7.999", "class": "rate_limited", "slow": "5m"},
    ]))
    rules = load_rules(str(f))
    v = classify(550, "550 5.7.1 listed at spamhaus", True, rules)
    assert (v.klass, v.retry, v.rule) == ("policy", True, "listed")
    assert classify(550, "550 5.7.1 other", True, rules).retry is False  # the default again
    assert classify(550, "550 user gone away", True, rules).suppress is True
    assert classify(451, "451 4.7.999 slow", False, rules).slow == 300.0


@pytest.mark.parametrize("bad", [
    {"status": "5.7.1", "class": "policy", "suppress": True},  # never on policy
    {"status": "5.2.2", "class": "mailbox_full", "suppress": True},
    {"class": "nonsense"},
    {"status": "5.1.1"},
    {"class": "hard", "colour": "red"},
    {"class": "hard", "retry": "yes"},
])
def test_bad_operator_rules_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        rule_from_dict(bad, "test")


def test_retried_reply_never_suppresses(tmp_path: Path) -> None:
    f = tmp_path / "rules.json"
    f.write_text(json.dumps([{"status": "5.1.1", "class": "hard", "suppress": True, "retry": True}]))
    v = classify(550, "550 5.1.1 unknown", True, load_rules(str(f)))
    assert v.retry and not v.suppress


def test_default_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILFLOW_BOUNCE_RULES", raising=False)
    assert load_rules() == load_rules("")


def test_backoff_doubles_and_clears() -> None:
    b = DestinationBackoff()
    assert b.paused("gmail.test", 0.0) is None
    assert b.pause("gmail.test", 10.0, 100.0) == 110.0
    assert b.paused("gmail.test", 105.0) == 110.0
    assert b.pause("gmail.test", 10.0, 110.0) == 130.0  # the second in a row: twice as long
    assert b.paused("other.test", 105.0) is None
    assert b.paused("gmail.test", 131.0) is None
    for _ in range(20):
        end = b.pause("gmail.test", 10.0, 1000.0)
    assert end == 1000.0 + MAX_SLOW
    b.clear("gmail.test")
    assert b.paused("gmail.test", 1001.0) is None
    assert b.pause("gmail.test", 10.0, 2000.0) == 2010.0
