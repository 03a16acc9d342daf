"""`mailflow sink`: a local SMTP server that accepts everything (aiosmtpd).

Each message is written as ``<dir>/<n>-<message-id>.eml`` exactly as received,
preceded by a Received-style ``X-Mailflow-Sink-Envelope`` header naming the
envelope, so tests and demos can count deliveries by Message-ID.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

_SAFE = re.compile(r"[^A-Za-z0-9._@-]+")


class SinkHandler:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.counter = itertools.count(len(list(self.dir.glob("*.eml"))) + 1)
        self.received = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data: bytes = envelope.original_content or envelope.content  # type: ignore[assignment]
        mid = re.search(rb"^Message-ID:\s*<?([^>\r\n]*)>?", data, re.I | re.M)
        name = _SAFE.sub("_", mid.group(1).decode("ascii", "replace"))[:120] if mid else "no-id"
        env = (f"X-Mailflow-Sink-Envelope: from=<{envelope.mail_from}> "
               f"to={','.join(f'<{r}>' for r in envelope.rcpt_tos)}\r\n").encode()
        path = self.dir / f"{next(self.counter):08d}-{name}.eml"
        tmp = path.with_suffix(".tmp")
        await asyncio.to_thread(_write, tmp, env + data)
        os.replace(tmp, path)  # readers never see a half-written file
        self.received += 1
        return "250 2.0.0 OK queued as " + path.stem


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def run(host: str, port: int, directory: Path) -> int:
    handler = SinkHandler(directory)
    controller = Controller(handler, hostname=host, port=port, enable_SMTPUTF8=True,
                            decode_data=False, data_size_limit=64 * 1024 * 1024,
                            server_kwargs={"ident": "mailflow sink"})
    controller.start()
    print(f"mailflow sink: listening on {host}:{port}, writing to {directory}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        loop.run_until_complete(stop.wait())
    finally:
        controller.stop()
        print(f"mailflow sink: stopped after {handler.received} messages", flush=True)
    return 0


