"""mailflow.mta.domains on the real broker: the ``domains`` topic, ``ensure`` (what
``mailflow up`` calls for the local domains), removal, and a Signer that starts after
the keys were made signing at once (a restarted stage replica)."""

from __future__ import annotations

import uuid
from pathlib import Path

import dkim
import pytest

from mailflow.config import Settings
from mailflow.mta import domains as dom
from mailflow.mta.signing import Signer


@pytest.fixture()
def settings(kafka: str, tmp_path: Path) -> Settings:
    return Settings(kafka_bootstrap=kafka, data_dir=tmp_path, topic_prefix=f"t{uuid.uuid4().hex[:8]}.",
                    partitions=1, local_domains=frozenset({"a.test", "b.test"}))


async def test_ensure_remove_and_a_new_signer_signs_at_once(settings: Settings) -> None:
    assert dom.ensure(settings, sorted(settings.local_domains)) == ["a.test", "b.test"]
    assert dom.ensure(settings, sorted(settings.local_domains)) == []  # kept, not made again
    recs = dom.read_all(settings)
    assert set(recs) == {"a.test", "b.test"}
    with pytest.raises(dom.DomainError, match="has DKIM keys already"):
        dom.add(settings, "A.test")
    signer = Signer(settings)  # as a stage replica that starts now: the keys are read first
    try:
        msg = b"From: x@a.test\r\nTo: y@r.test\r\nSubject: s\r\n\r\nbody\r\n"
        header, detail = await signer.sign(msg)
        assert detail == {"signed": True, "d": "a.test", "s": [recs["a.test"]["selectors"][0]["selector"]]}
        records = {f"{r['name']}.".encode(): r["value"].encode()
                   for r in dom.dns_records(recs["a.test"], settings) if "_domainkey" in r["name"]}
        assert dkim.verify(header + msg, dnsfunc=lambda n, timeout=5: records.get(n))
        _, detail = await signer.sign(b"From: x@c.test\r\n\r\nbody\r\n")
        assert detail == {"signed": False, "domain": "c.test", "reason": "no DKIM key for c.test"}
        dom.write(settings, "b.test", None)
        assert set(dom.read_all(settings)) == {"a.test"}
    finally:
        signer.close()


async def test_required_mode_marks_unsignable_mail(settings: Settings) -> None:
    from dataclasses import replace

    dom.write(settings, "r.test", {**dom.new_domain(b"k" * 32, "r.test"), "selectors": []})
    signer = Signer(replace(settings, dkim="required"))
    try:
        _, detail = await signer.sign(b"From: x@none.test\r\n\r\nbody\r\n")
        assert detail["required"] is True and detail["reason"] == "no DKIM key for none.test"
        _, detail = await signer.sign(b"From: x@r.test\r\n\r\nbody\r\n")
        assert detail == {"signed": False, "domain": "r.test", "reason": "r.test has no active DKIM selector",
                          "required": True}
    finally:
        signer.close()
