"""Validator stage.

Input: ``admitted`` (key: sender). Outputs: ``local`` (key: mailbox) one record per
local recipient's inbox, plus the sender's Sent folder when the sender is local;
``outgoing`` (key: message id) one record with every remote recipient;
``errors`` with state ``rejected`` and a reason code for invalid mail; ``events``.

A message with local and remote recipients goes both ways. Bodies routed to
mailboxes are put in the object store once here, so ``local`` records carry a
reference instead of a copy per recipient.
"""

from __future__ import annotations

import faust

from agents.common import Pending, StageIO
from mailflow.config import Settings
from mailflow.mailrules import (
    check_message,
    mailbox_key,
    parse_headers,
    split_recipients,
    summarize,
)
from mailflow.objstore import body_key, put_body
from schemas.records import parse_message

STAGE = "validate"


def register(app: faust.App, settings: Settings) -> None:
    io = StageIO(app, settings, STAGE)

    async def handle(raw: bytes | None) -> Pending:
        msg = parse_message(raw)
        body = await io.body(msg)
        headers = parse_headers(body)  # once, for the checks and the listing summary
        problems = check_message(msg.sender, msg.recipients, body, headers=headers,
                                 max_bytes=settings.max_message_bytes,
                                 max_recipients=settings.max_recipients)
        if problems:
            first = problems[0]
            detail = "; ".join(p.message for p in problems)
            return [
                await io.park(first.code, "rejected", raw, msg.id, detail),
                await io.event(msg.id, "rejected", msg.recipients,
                               {"reason": first.code, "message": detail}, sender=msg.sender),
            ]
        local, remote = split_recipients(msg.recipients, settings.local_domains)
        meta = {**msg.meta, "summary": summarize(body, headers)}
        pending: Pending = []
        if local:
            ref = msg.body_ref
            if ref is None:
                ref = body_key(msg.id)
                await put_body(settings.object_store_url, ref, body)
            # Mailboxes of our domains are keyed case-insensitively (`mailbox_key`):
            # VICTIM@ and victim@ are one inbox, one copy naming both.
            boxes: dict[tuple[str, str], list[str]] = {}
            for r in dict.fromkeys(local):
                boxes.setdefault((mailbox_key(r), "inbox"), []).append(r)
            if settings.is_local(msg.sender):
                boxes[(mailbox_key(msg.sender), "sent")] = msg.recipients
            for (mailbox, folder), rcpts in boxes.items():
                # An inbox copy names only its own recipients: Bcc recipients stay hidden.
                rec = msg.with_(body=None, body_ref=ref, recipients=rcpts, mailbox=mailbox,
                                folder=folder, meta=meta)
                pending.append(await io.send("local", mailbox, rec.to_json()))
        if remote:
            rec = msg.with_(recipients=remote, meta=meta)
            pending.append(await io.send("outgoing", msg.id, rec.to_json()))
            pending.append(await io.event(msg.id, "validated", remote, {"next": "scan"}))
        return pending

    @app.agent(io.topic("admitted"), name=f"{settings.topic_prefix}{STAGE}")
    async def validate(stream: faust.StreamT) -> None:
        await io.run_batches(stream, handle)
