"""bench/smtp_client.py against a real smtp-sink: both of its modes deliver, and the
one-at-a-time mode really sends one command at a time (no PIPELINING seen)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

_spec = importlib.util.spec_from_file_location(
    "smtp_client", Path(__file__).resolve().parents[2] / "bench" / "smtp_client.py")
assert _spec and _spec.loader
smtp_client: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smtp_client)


async def test_both_modes_deliver_to_smtp_sink() -> None:
    from devtools.bench import start_smtp_sink

    sink, port = start_smtp_sink()
    try:
        for pipelined in (True, False):
            res = await smtp_client.one_round(pipelined, port, count=20, concurrency=4, size=800)
            assert res["cpu_ms_per_msg"] > 0 and res["msgs_per_s"] > 0
        pool = smtp_client._NoPipelining(ehlo="mailflow.test", timeout=5, tls="off")
        smtp = await pool._open("127.0.0.1", port)
        assert not smtp.supports_extension("pipelining")  # smtp-sink offers it; the mode hides it
        smtp.close()
    finally:
        sink.terminate()
        sink.wait(10)
