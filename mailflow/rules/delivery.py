"""Pure delivery decisions: reply classes, the retry ladder, expiry, shaping."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

TEMPORARY, PERMANENT, DELIVERED = "temporary", "permanent", "delivered"


@dataclass(frozen=True)
class Outcome:
    """What happened to one recipient in one attempt."""

    recipient: str
    kind: str  # delivered | temporary | permanent
    code: int | None
    reply: str
    host: str | None = None
    tls: dict[str, Any] | None = None  # the connection's TLS (mailflow.mta.smtp.tls_summary)


def classify_code(code: int) -> str:
    """RFC 5321 §4.2.1: 2xx accepted, 4xx try again later, 5xx do not try again."""
    if 200 <= code < 300:
        return DELIVERED
    if 500 <= code < 600:
        return PERMANENT
    return TEMPORARY  # 4xx, and anything odd, is worth another try


def reply_class(o: Outcome) -> str:
    """A bounded label for metrics."""
    return f"{o.code // 100}xx" if o.code else "conn"


def retry_tier(attempt: int, tiers: int) -> int:
    """Tier (1-based) for the retry after failed attempt number `attempt` (1-based).

    Each tier has one fixed delay; past the last tier mail stays at the last one.
    """
    return max(1, min(attempt, tiers))


def next_due(now: float, attempt: int, schedule: tuple[float, ...]) -> tuple[int, float]:
    tier = retry_tier(attempt, len(schedule))
    return tier, now + schedule[tier - 1]


def expired(first_attempt: float, now: float, max_age: float) -> bool:
    return now - first_attempt >= max_age


def default_schedule(first: float = 60.0, last: float = 4 * 3600.0) -> tuple[float, ...]:
    """From `first` doubling up to about `last`: 1m, 2m, 4m ... 4h16m by default."""
    out = [first]
    while out[-1] * 2 <= last * 1.1:
        out.append(out[-1] * 2)
    return tuple(out)


@dataclass
class Shaper:
    """Per-destination bounds: concurrent deliveries and messages per window.

    A destination at its bound is not waited for: its mail steps aside to a
    retry tier, so one slow or greylisting domain cannot hold up the others
    sharing its partition.
    """

    max_in_flight: int = 8
    rate: tuple[int, float] | None = None  # (messages, seconds) per destination
    in_flight: dict[str, int] = field(default_factory=dict)
    windows: dict[str, tuple[float, int]] = field(default_factory=dict)

    def try_acquire(self, dest: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.in_flight.get(dest, 0) >= self.max_in_flight:
            return False
        if self.rate is not None:
            limit, size = self.rate
            start, count = self.windows.get(dest, (now, 0))
            if now - start >= size:
                start, count = now, 0
            if count >= limit:
                return False
            self.windows[dest] = (start, count + 1)
        self.in_flight[dest] = self.in_flight.get(dest, 0) + 1
        return True

    def release(self, dest: str) -> None:
        n = self.in_flight.get(dest, 0) - 1
        if n > 0:
            self.in_flight[dest] = n
        else:
            self.in_flight.pop(dest, None)
