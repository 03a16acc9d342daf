"""Virus and spam scanners at the edge: clamd (python-clamd) and rspamd (HTTP).

`verdict` is the pure decision over what they answered.
"""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import clamd

from mailflow import metrics


class ScannerUnavailable(Exception):
    """A scanner did not answer (refused, reset, timed out, or an error reply)."""

    def __init__(self, scanner: str, why: str) -> None:
        super().__init__(f"{scanner} unavailable: {why}")
        self.scanner = scanner


@dataclass
class Verdict:
    kind: str  # clean | virus | spam
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return self.kind == "clean"


SPAM_ACTIONS = frozenset({"reject", "soft reject"})


def verdict(clam: tuple[str, str | None] | None, spam: dict[str, Any] | None) -> Verdict:
    """Infected beats spam beats clean. `None` means that scanner was skipped."""
    if clam is not None and clam[0] == "FOUND":
        return Verdict("virus", {"scanner": "clamd", "signature": clam[1]})
    if spam is not None and spam.get("action") in SPAM_ACTIONS:
        symbols = sorted(spam.get("symbols", {}), key=lambda s: -abs(
            float(spam["symbols"][s].get("score", 0)) if isinstance(spam["symbols"][s], dict) else 0))
        return Verdict("spam", {"scanner": "rspamd", "action": spam.get("action"),
                                "score": spam.get("score"), "required": spam.get("required_score"),
                                "symbols": symbols[:20]})
    detail: dict[str, Any] = {}
    if spam is not None:
        detail = {"spam_score": spam.get("score"), "spam_action": spam.get("action")}
    return Verdict("clean", detail)


class Clamd:
    def __init__(self, address: str, timeout: float = 30.0) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port, self.timeout = host or "127.0.0.1", int(port), timeout

    def _scan(self, data: bytes) -> tuple[str, str | None]:
        cd = clamd.ClamdNetworkSocket(self.host, self.port, timeout=self.timeout)
        result = cd.instream(io.BytesIO(data))["stream"]
        return result[0], result[1]

    async def scan(self, data: bytes) -> tuple[str, str | None]:
        started = time.perf_counter()
        try:
            status, name = await asyncio.to_thread(self._scan, data)
        except (clamd.ConnectionError, OSError, TimeoutError) as exc:
            metrics.SCANNER_UP.labels("clamd").set(0)
            raise ScannerUnavailable("clamd", repr(exc)) from None
        if status == "ERROR":
            metrics.SCANNER_UP.labels("clamd").set(0)
            raise ScannerUnavailable("clamd", f"error reply: {name}")
        metrics.SCANNER_UP.labels("clamd").set(1)
        metrics.SCAN_SECONDS.labels("clamd").observe(time.perf_counter() - started)
        metrics.SCAN_VERDICTS.labels("clamd", "infected" if status == "FOUND" else "clean").inc()
        return status, name


class Rspamd:
    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/") + "/checkv2"
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def check(self, data: bytes, sender: str, recipients: list[str], queue_id: str) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        headers = [("From", sender or "<>"), ("Queue-Id", queue_id)]
        headers += [("Rcpt", r) for r in recipients[:100]]
        started = time.perf_counter()
        try:
            async with self._session.post(self.url, data=data, headers=headers) as resp:
                if resp.status != 200:
                    raise ScannerUnavailable("rspamd", f"HTTP {resp.status}")
                doc = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            metrics.SCANNER_UP.labels("rspamd").set(0)
            raise ScannerUnavailable("rspamd", repr(exc)) from None
        metrics.SCANNER_UP.labels("rspamd").set(1)
        metrics.SCAN_SECONDS.labels("rspamd").observe(time.perf_counter() - started)
        action = str(doc.get("action", "?"))
        metrics.SCAN_VERDICTS.labels("rspamd", "spam" if action in SPAM_ACTIONS else "ham").inc()
        return doc
