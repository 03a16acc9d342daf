"""Bounce and deferral rules: what an SMTP reply means, and what to do about it.

Every reply that is not a success is classified by the first rule of the table
that matches it, into one of five classes:

``hard``
    the recipient cannot receive mail (the mailbox does not exist or is
    disabled: 5.1.1, 5.1.2, 5.1.10, 5.2.1 ...), or any other permanent refusal
    without a better rule; only the mailbox rules suppress the recipient.
``soft``
    a temporary failure: try again later (4xx, no answer at all).
``policy``
    refused for policy or reputation (5.7.x, 4.7.x): never suppressed, since the
    recipient exists and the next message may well be taken.
``rate_limited``
    the destination says we send too fast (Gmail ``421 4.7.28``, Outlook
    ``451 4.7.650``, Yahoo ``421 4.7.0 [TS01]`` ...): the destination is slowed
    down (`DestinationBackoff`) and the message waits without spending one of
    its attempts.
``mailbox_full``
    over quota (4.2.2, 5.2.2): retried when temporary, bounced when permanent,
    never suppressed.

A rule decides `retry` (True: defer; False: bounce; None: as the reply code says,
4xx defer, 5xx bounce, no reply as the transport judged it), `suppress` (only
for the class ``hard``; anything else is refused when the rules are loaded, and a
reply that is retried never suppresses), and for ``rate_limited`` how long to
pause the destination at first (`slow`, doubled for each rate-limit reply in a
row, up to `MAX_SLOW`).

Operators put their own rules in a JSON file named by ``MAILFLOW_BOUNCE_RULES``:
a list of objects ``{"status": "5.7.1", "code": "550", "text": "regex",
"class": "policy", "retry": false, "suppress": false, "slow": "2m"}`` (every key
but ``class`` optional; ``status`` and ``code`` are shell-style patterns such as
``5.7.*``, ``4*``; ``text`` is a case-insensitive regular expression searched in
the reply). Their rules are tried before the defaults (`load_rules`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailflow.config import parse_duration

CLASSES = ("hard", "soft", "policy", "rate_limited", "mailbox_full")
DEFAULT_SLOW = 60.0  # first pause of a rate-limited destination, seconds
MAX_SLOW = 3600.0

# The enhanced code anywhere in a reply's first line: replies reach us as
# "550 5.1.1 ...", but also wrapped ("mx.test disconnected: 421 4.7.28 ...").
_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_BASIC = re.compile(r"(?<!\d)([245]\d\d)(?:[ -]|$)")


@dataclass(frozen=True)
class Rule:
    """One row of the table; None matches anything."""

    klass: str
    status: str | None = None  # enhanced code pattern, e.g. "5.1.1", "5.7.*"
    code: str | None = None  # basic reply code pattern, e.g. "421", "5*"
    text: str | None = None  # regex searched (case-insensitive) in the reply
    retry: bool | None = None
    suppress: bool = False
    slow: float = DEFAULT_SLOW
    name: str = ""
    _text_re: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.klass not in CLASSES:
            raise ValueError(f"bounce rule {self.name or self.status!r}: class must be one of "
                             f"{', '.join(CLASSES)}, not {self.klass!r}")
        if self.suppress and self.klass != "hard":
            # Policy refusals, full mailboxes and temporary failures say nothing
            # about the address; suppressing on them loses good recipients.
            raise ValueError(f"bounce rule {self.name or self.status!r}: only class hard may suppress")
        if self.text is not None:
            object.__setattr__(self, "_text_re", re.compile(self.text, re.I))

    def matches(self, code: int | None, status: str | None, reply: str) -> bool:
        if self.status is not None and not fnmatch.fnmatchcase(status or "", self.status):
            return False
        if self.code is not None and not fnmatch.fnmatchcase(str(code or ""), self.code):
            return False
        return self._text_re is None or bool(self._text_re.search(reply))


@dataclass(frozen=True)
class Verdict:
    """What to do with one failed recipient."""

    klass: str
    retry: bool  # True: defer to a retry tier; False: bounce
    suppress: bool
    slow: float = 0.0  # > 0: pause the destination (rate_limited)
    rule: str = ""


_MAILBOX_GONE = r"(user|mailbox|recipient|address)\s+(unknown|not found|does not exist|disabled)|no such (user|mailbox|recipient)"

DEFAULT_RULES: tuple[Rule, ...] = (
    # Rate limits first: they carry x.7.x codes that would otherwise read as policy.
    Rule("rate_limited", status="4.7.28", name="gmail-rate"),
    Rule("rate_limited", status="4.7.650", name="outlook-rate"),
    Rule("rate_limited", status="4.7.*", text=r"\[TS0\d\]|rate limit|too many (messages|connections|emails)"
         r"|sending rate|temporarily deferred due to", name="rate-text"),
    Rule("rate_limited", code="421", text=r"rate limit|too many (messages|connections)|try again later.*rate",
         name="421-rate"),
    Rule("rate_limited", code="450", text=r"rate limit|too many", name="450-rate"),
    Rule("mailbox_full", status="?.2.2", name="quota"),
    Rule("mailbox_full", text=r"over quota|mailbox (is )?full|quota exceeded|insufficient storage",
         name="quota-text"),
    # Mailboxes that do not exist or are disabled: the only suppressing rules.
    Rule("hard", status="5.1.1", suppress=True, name="no-such-user"),
    Rule("hard", status="5.1.2", suppress=True, name="bad-destination"),
    Rule("hard", status="5.1.3", suppress=True, name="bad-address-syntax"),
    Rule("hard", status="5.1.6", suppress=True, name="mailbox-moved"),
    Rule("hard", status="5.1.10", suppress=True, name="null-mx"),
    Rule("hard", status="5.2.1", suppress=True, name="mailbox-disabled"),
    Rule("policy", status="?.7.*", name="policy"),
    # Old servers without enhanced codes.
    Rule("hard", status="", code="55[03]", text=_MAILBOX_GONE, suppress=True, name="no-such-user-text"),
    Rule("hard", code="5*", name="permanent"),
    Rule("soft", name="temporary"),
)


def reply_parts(code: int | None, reply: str) -> tuple[int | None, str | None]:
    """(basic code, enhanced code) of a reply, each None where absent."""
    first = (reply or "").splitlines()[0] if reply else ""
    if code is None and (m := _BASIC.search(first)):
        code = int(m.group(1))
    m2 = _ENHANCED.search(first)
    status = ".".join(str(int(p)) for p in m2.groups()) if m2 else None
    return code, status


def classify(code: int | None, reply: str, permanent: bool,
             rules: tuple[Rule, ...] = DEFAULT_RULES) -> Verdict:
    """The verdict on one failed recipient's reply.

    `permanent` is what the transport judged (a 5xx reply, or a local permanent
    reason such as a null MX); it decides for rules whose `retry` is None."""
    code, status = reply_parts(code, reply)
    for rule in rules:
        if rule.matches(code, status, reply or ""):
            if rule.retry is not None:
                retry = rule.retry
            elif code is not None:
                retry = not 500 <= code < 600
            else:
                retry = not permanent
            return Verdict(rule.klass, retry, rule.suppress and not retry,
                           rule.slow if rule.klass == "rate_limited" and retry else 0.0, rule.name)
    return Verdict("soft" if not permanent else "hard", not permanent, False)


def rule_from_dict(d: dict[str, Any], where: str = "") -> Rule:
    """A `Rule` from an operator's JSON object (see the module docstring)."""
    unknown = set(d) - {"class", "status", "code", "text", "retry", "suppress", "slow", "name"}
    if unknown:
        raise ValueError(f"bounce rule {where}: unknown key(s) {', '.join(sorted(unknown))}")
    if "class" not in d:
        raise ValueError(f"bounce rule {where}: class is required")
    retry = d.get("retry")
    if retry is not None and not isinstance(retry, bool):
        raise ValueError(f"bounce rule {where}: retry must be true, false or null")
    slow = d.get("slow", DEFAULT_SLOW)
    slow_s = parse_duration(slow) if isinstance(slow, str) else float(slow)
    return Rule(klass=str(d["class"]), status=d.get("status"), code=d.get("code"),
                text=d.get("text"), retry=retry, suppress=bool(d.get("suppress", False)),
                slow=slow_s, name=str(d.get("name", where)))


def load_rules(path: str | None = None) -> tuple[Rule, ...]:
    """The operator's rules (``MAILFLOW_BOUNCE_RULES``, a JSON file) before the
    defaults; just the defaults without one. A bad file is an error at start,
    never a silent fallback."""
    path = path if path is not None else os.environ.get("MAILFLOW_BOUNCE_RULES", "")
    if not path:
        return DEFAULT_RULES
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, list) or not all(isinstance(x, dict) for x in doc):
        raise ValueError(f"{path}: bounce rules must be a JSON list of objects")
    return tuple(rule_from_dict(x, f"{path}[{i}]") for i, x in enumerate(doc)) + DEFAULT_RULES


@dataclass
class DestinationBackoff:
    """Destinations that told us to slow down, and until when.

    Each rate-limit reply in a row doubles the pause (from the rule's `slow`, up to
    `MAX_SLOW`); a successful delivery ends it. While paused, mail for the
    destination steps aside to the retry tiers without a connection and without
    spending an attempt."""

    until: dict[str, float] = field(default_factory=dict)
    strikes: dict[str, int] = field(default_factory=dict)

    def pause(self, dest: str, slow: float, now: float) -> float:
        """Pause `dest` after a rate-limit reply; returns when it ends."""
        n = self.strikes.get(dest, 0)
        self.strikes[dest] = n + 1
        end = now + min(slow * (2 ** n), MAX_SLOW)
        self.until[dest] = max(self.until.get(dest, 0.0), end)
        return self.until[dest]

    def paused(self, dest: str, now: float) -> float | None:
        """When `dest`'s pause ends, or None if it is not paused."""
        end = self.until.get(dest)
        if end is None or end <= now:
            return None
        return end

    def clear(self, dest: str) -> None:
        self.until.pop(dest, None)
        self.strikes.pop(dest, None)
