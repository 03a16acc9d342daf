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

from mailflow.config import Settings
from mailflow.objstore import store_body
from mailflow.rules.mailrules import (
    check_message,
    mailbox_key,
    parse_headers,
    split_recipients,
    summarize,
)
from schemas.mail import LocalCopy, Outgoing, parse_submission
from streams.runtime import Outputs, Stage

STAGE = "validate"


def register(app: faust.App, settings: Settings) -> Stage:
    stage = Stage(app, settings, STAGE)

    async def handle(raw: bytes | None) -> Outputs:
        msg = parse_submission(raw)
        out = stage.outputs()
        body = await stage.body(msg)
        headers = parse_headers(body)  # once, for the checks and the listing summary
        problems = check_message(msg.sender, msg.recipients, body, headers=headers,
                                 max_bytes=settings.max_message_bytes,
                                 max_recipients=settings.max_recipients)
        if problems:
            first = problems[0]
            detail = "; ".join(p.message for p in problems)
            out.park(first.code, "rejected", raw, msg.id, detail)
            out.event(msg.id, "rejected", msg.recipients,
                      {"reason": first.code, "message": detail}, sender=msg.sender)
            return out
        local, remote = split_recipients(msg.recipients, settings.local_domains)
        summary = summarize(body, headers)
        if local:
            ref = msg.body_ref
            if ref is None:
                ref = await store_body(settings.object_store_url, msg.id, body)
            # Mailboxes of our domains are keyed case-insensitively (`mailbox_key`):
            # VICTIM@ and victim@ are one inbox, one copy naming both.
            boxes: dict[tuple[str, str], list[str]] = {}
            for r in dict.fromkeys(local):
                boxes.setdefault((mailbox_key(r), "inbox"), []).append(r)
            if settings.is_local(msg.sender):
                boxes[(mailbox_key(msg.sender), "sent")] = msg.recipients
            for (mailbox, folder), rcpts in boxes.items():
                # An inbox copy names only its own recipients: Bcc recipients stay hidden.
                copy = msg.to(LocalCopy, body=None, body_ref=ref, recipients=rcpts,
                              mailbox=mailbox, folder=folder, summary=summary)
                out.send("local", mailbox, copy.to_json())
        if remote:
            rec = msg.to(Outgoing, recipients=remote, summary=summary)
            out.send("outgoing", msg.id, rec.to_json())
            out.event(msg.id, "validated", remote, {"next": "scan"})
        return out

    stage.agent("admitted", handle)
    return stage
