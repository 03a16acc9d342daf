"""Scanner stage.

Input: ``outgoing`` (key: message id). Outputs: ``clean`` (key: message id) with the
verdict in ``meta.scan``; ``errors`` with state ``quarantined`` and the verdict
(virus name, or spam score and symbols) for infected or spam mail; ``events``
(``scanned`` or ``quarantined``).

clamd gets the whole RFC 5322 message over INSTREAM (it decodes MIME parts and
archives), rspamd gets it over ``/checkv2`` with the envelope. Scans run
concurrently (several actors) and Faust commits a partition's offset only up to
the first unfinished record, so a slow scan never lets a later offset commit past
it. When a scanner does not answer: ``SCAN_FAILURE=closed`` (default) retries
with backoff and the message waits (lag grows, status says why); ``open`` passes
the message on marked as not scanned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import faust

from mailflow.config import Settings
from mailflow.mta.scanners import Clamd, Rspamd, ScannerUnavailable, verdict
from schemas.mail import ScanVerdict, parse_outgoing
from streams.runtime import Outputs, Stage

STAGE = "scan"


def register(app: faust.App, settings: Settings) -> Stage:
    stage = Stage(app, settings, STAGE)
    clam = Clamd(settings.clamd) if "clamd" in settings.scanners else None
    spam = Rspamd(settings.rspamd) if "rspamd" in settings.scanners else None
    waiting_told: set[str] = set()  # ids whose status already says they wait on a scanner

    async def scan(body: bytes, sender: str, rcpts: list[str], msg_id: str) -> tuple[Any, Any]:
        jobs: list[Coroutine[Any, Any, Any]] = []
        if clam:
            jobs.append(clam.scan(body))
        if spam:
            jobs.append(spam.check(body, sender, rcpts, msg_id))
        results = await asyncio.gather(*jobs)
        it = iter(results)
        return (next(it) if clam else None), (next(it) if spam else None)

    async def handle(raw: bytes | None) -> Outputs:
        msg = parse_outgoing(raw)
        out = stage.outputs()
        body = await stage.body(msg)
        try:
            clam_result, spam_result = await scan(body, msg.sender, msg.recipients, msg.id)
        except ScannerUnavailable as exc:
            if settings.scan_failure == "open":
                rec = msg.with_(scan=ScanVerdict(False, str(exc)))
                out.send("clean", msg.id, rec.to_json())
                out.event(msg.id, "scanned", msg.recipients, {"scanned": False, "reason": str(exc)})
                return out
            if msg.id not in waiting_told:
                # The status says once what the message waits on; the event is
                # acknowledged before the record's first retry.
                waiting_told.add(msg.id)
                out.event(msg.id, "validated", msg.recipients, {"next": "scan", "waiting": str(exc)})
            out.retry_later(str(exc))  # closed: retried with backoff
            return out
        waiting_told.discard(msg.id)
        v = verdict(clam_result, spam_result)
        if not v.clean:
            detail = {"verdict": v.kind, **v.detail}
            out.park(v.kind, "quarantined", raw, msg.id, str(detail))
            out.event(msg.id, "quarantined", msg.recipients, detail, sender=msg.sender)
            return out
        rec = msg.with_(scan=ScanVerdict(bool(settings.scanners), detail=dict(v.detail)))
        out.send("clean", msg.id, rec.to_json())
        out.event(msg.id, "scanned", msg.recipients, v.detail)
        return out

    # 32 scans in flight: under load a scan waits tens of ms on the busy scanners, so
    # with 8 the stage was bound by that wait, not by CPU (16 % more delivered/s with
    # scanning on, docs/BENCHMARKS.md).
    stage.agent("outgoing", handle, mode="each", concurrency=32)
    return stage
