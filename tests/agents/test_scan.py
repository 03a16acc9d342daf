"""The scan stage's verdict routing, its handler called with stand-in scanners (the
scanners themselves are tested against clamd and rspamd in tests/pipeline)."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from agents import scan
from mailflow.mta.scanners import ScannerUnavailable
from schemas.mail import Outgoing, ScanVerdict, parse_outgoing


class FakeClamd:
    result: tuple[str, str | None] | Exception = ("OK", None)

    def __init__(self, address: object) -> None:
        pass

    async def scan(self, body: bytes) -> tuple[str, str | None]:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.fixture
def scan_stage(app, settings, monkeypatch):
    monkeypatch.setattr(scan, "Clamd", FakeClamd)

    def make(result, **changes):
        monkeypatch.setattr(FakeClamd, "result", result)
        return scan.register(app, dataclasses.replace(settings, scanners=("clamd",), **changes))
    return make


async def test_clean_mail_goes_to_clean_with_its_verdict(scan_stage, make_message):
    handle = scan_stage(("OK", None)).handlers["outgoing"]
    msg = make_message(kind=Outgoing)
    out = await handle(msg.to_json())
    assert [t for t, _, _, _ in out.records] == ["clean", "events"]
    clean = parse_outgoing(out.sent("clean")[0][1])
    assert clean.scan == ScanVerdict(True) and clean.with_(scan=None) == msg
    assert out.states() == [("scanned", ["bob@x.test"])] and out.retry is None


async def test_a_virus_is_parked_and_quarantined(scan_stage, make_message):
    handle = scan_stage(("FOUND", "Eicar-Test-Signature")).handlers["outgoing"]
    out = await handle(make_message(kind=Outgoing).to_json())
    assert [t for t, _, _, _ in out.records] == ["errors", "events"]
    parked = orjson.loads(out.sent("errors")[0][1])
    assert (parked["reason"], parked["state"]) == ("virus", "quarantined")
    assert out.states() == [("quarantined", ["bob@x.test"])]


async def test_a_scanner_down_says_so_once_then_retries_later(scan_stage, make_message):
    handle = scan_stage(ScannerUnavailable("clamd", "connection refused")).handlers["outgoing"]
    raw = make_message(kind=Outgoing).to_json()
    first = await handle(raw)
    assert first.states() == [("validated", ["bob@x.test"])] and first.retry
    assert orjson.loads(first.sent("events")[0][1])["detail"]["waiting"] == "clamd unavailable: connection refused"
    again = await handle(raw)
    assert again.records == [] and again.retry  # told already: only wait


async def test_fail_open_passes_mail_on_marked_not_scanned(scan_stage, make_message):
    handle = scan_stage(ScannerUnavailable("clamd", "down"), scan_failure="open").handlers["outgoing"]
    out = await handle(make_message(kind=Outgoing).to_json())
    clean = parse_outgoing(out.sent("clean")[0][1])
    assert clean.scan == ScanVerdict(False, "clamd unavailable: down")
    assert clean.meta["scan"] == {"scanned": False, "reason": "clamd unavailable: down"}  # the wire
    assert out.retry is None
