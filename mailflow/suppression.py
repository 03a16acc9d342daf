"""The suppression list: recipients a sender domain must not mail.

Entries are keyed by (sender domain, recipient address), both lower-cased, and live
on the compacted topic ``suppressions`` (key ``<domain>|<address>``, value JSON
``{"domain", "address", "reason", "source", "ts", ...}``; a tombstone removes
one). They are written by the deliver stage on a hard bounce (see
`mailflow.rules.bounce_rules`: the mailbox does not exist or is disabled), by the
one-click unsubscribe endpoint, and by the API (``POST /v1/suppressions``), and
survive every restart since the topic is the store.

Readers (`SuppressionList`) follow the topic from its start in a thread; the
deliver stage checks every recipient against it before any SMTP transaction, and
waits until it has read the whole topic once before its first check. Its own
writes are seen at once; another replica's, within the reader's poll (well under
a second).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from mailflow.config import Settings
from mailflow.kafka_io import AsyncProducer
from streams.topics import full_name

TOPIC = "suppressions"
REASONS = ("hard_bounce", "unsubscribe", "api")


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def key(domain: str, address: str) -> str:
    """The topic key of (sender domain, recipient): case-insensitive, as operators expect."""
    return f"{domain.strip().lower()}|{address.strip().lower()}"


def entry(domain: str, address: str, reason: str, source: str, ts: float | None = None,
          **detail: Any) -> dict[str, Any]:
    """A suppression record; `detail` adds fields such as the bounce ``reply``."""
    return {"domain": domain.strip().lower(), "address": address.strip().lower(),
            "reason": reason, "source": source, "ts": ts if ts is not None else time.time(),
            **{k: v for k, v in detail.items() if v is not None}}


def produce(producer: AsyncProducer, settings: Settings, rec: dict[str, Any] | None,
            domain: str = "", address: str = "") -> asyncio.Future[tuple[int, int]]:
    """Write `rec` (or, with None, a tombstone for `domain`, `address`); the future is
    the broker's ack."""
    k = key(rec["domain"], rec["address"]) if rec is not None else key(domain, address)
    value = orjson.dumps(rec) if rec is not None else None
    return producer.produce(full_name(settings, TOPIC), k.encode(), value)  # type: ignore[arg-type]


class SuppressionList:
    """The topic followed into memory, plus this process's own writes at once."""

    def __init__(self, settings: Settings) -> None:
        from mailflow.api.auth import SyncReader

        self.topic = full_name(settings, TOPIC)
        self.reader = SyncReader(settings.kafka_bootstrap, [self.topic])
        # Written here and maybe not read back yet: key -> (record, partition, offset).
        # (None: deleted here.)
        self._own: dict[str, tuple[dict[str, Any] | None, int, int]] = {}
        self._ready = False

    async def ready(self, within: float = 5.0) -> None:
        """Return once the whole topic has been read once; TimeoutError if the broker
        does not let it (a stage then retries the record: it must not send unchecked)."""
        if self._ready:
            return
        ok = await asyncio.get_running_loop().run_in_executor(None, self.reader.sync, self.topic, within)
        if not ok:
            raise TimeoutError("the suppression list could not be read from Kafka")
        self._ready = True

    def get(self, domain: str, address: str) -> dict[str, Any] | None:
        k = key(domain, address)
        own = self._own.get(k)
        if own is not None:
            rec, partition, offset = own
            if self.reader.positions.get((self.topic, partition), 0) <= offset:
                return rec
            del self._own[k]  # read back: the topic, later deletes included, decides
        return self.reader.values[self.topic].get(k)

    def remember(self, rec: dict[str, Any], partition: int, offset: int) -> None:
        """A record this process wrote, acknowledged at (partition, offset)."""
        self._own[key(rec["domain"], rec["address"])] = (rec, partition, offset)

    def forget(self, domain: str, address: str, partition: int, offset: int) -> None:
        """A tombstone this process wrote, acknowledged at (partition, offset)."""
        self._own[key(domain, address)] = (None, partition, offset)

    def entries(self, domain: str) -> list[dict[str, Any]]:
        prefix = f"{domain.strip().lower()}|"
        keys = {k for k in self.reader.values[self.topic] if k.startswith(prefix)}
        keys |= {k for k in self._own if k.startswith(prefix)}
        found = (self.get(*k.split("|", 1)) for k in keys)
        return sorted((v for v in found if v), key=lambda e: e["address"])

    def close(self) -> None:
        self.reader.close()
