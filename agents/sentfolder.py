"""Sent folder stage.

Input: ``clean`` (key: message id). Outputs: ``local`` (key: the sender's mailbox)
a Sent-folder copy when the sender is one of our mailboxes, stored by the store
stage like any local mail; ``delivery`` (key: recipient domain) one record per
recipient domain with that domain's recipients; ``events`` (``sent_folder``).

A message for several domains has its body put in the object store once, so
the per-domain records carry a reference rather than a copy each; a message for
one domain keeps its body inline on ``delivery`` (the Sent copy still goes by
reference), which spares the delivery stage an object-store read per message.

DKIM: this is where a message's headers and body are final, so it is signed here,
once (``mailflow.mta.signing``): the ``DKIM-Signature`` lines go into the records'
``meta.dkim`` (and, for one-click unsubscribe, one signature per recipient
over its own List-Unsubscribe headers in ``meta.dkim_rcpt``) and the delivery
stage puts them in front of the body for every attempt, so retries send the same
bytes. ``sent_folder``'s detail says whether and
with what it was signed. With ``MAILFLOW_DKIM=required`` a message whose From
domain has no key is parked on ``errors`` (reason ``dkim_key_missing``) and
rejected, never sent unsigned.
"""

from __future__ import annotations

import faust

from mailflow.config import Settings
from mailflow.mta.signing import Signer
from mailflow.objstore import store_body
from mailflow.rules.mailrules import group_by_domain
from mailflow.rules.unsubscribe import with_unsubscribe_headers
from schemas.mail import Delivery, LocalCopy, parse_outgoing
from streams.runtime import Outputs, Stage

STAGE = "sentfolder"


def register(app: faust.App, settings: Settings) -> Stage:
    stage = Stage(app, settings, STAGE)
    signer = Signer(settings)

    async def handle(raw: bytes | None) -> Outputs:
        msg = parse_outgoing(raw)
        out = stage.outputs()
        body = await stage.body(msg)
        header, dkim = await signer.sign(body)
        if dkim.get("required"):
            out.park("dkim_key_missing", "rejected", raw, msg.id, dkim["reason"])
            out.event(msg.id, "rejected", msg.recipients,
                      {"reason": "dkim_key_missing", "message": dkim["reason"]})
            return out
        if header:
            # One-click unsubscribe: each recipient's copy starts with its own two
            # List-Unsubscribe headers (deliver adds them), signed over with them.
            per = {}
            for rcpt, link in (msg.unsubscribe or {}).items():
                h, _ = await signer.sign(with_unsubscribe_headers(body, link))
                if h:
                    per[rcpt] = h.decode("ascii")
            msg = msg.with_(dkim=header.decode("ascii"), dkim_rcpt=per or None)
        groups = group_by_domain(msg.recipients)
        local_sender = bool(msg.sender) and settings.is_local(msg.sender)
        by_ref = msg
        if msg.body is not None and (local_sender or len(groups) > 1):
            ref = await store_body(settings.object_store_url, msg.id, msg.body)
            by_ref = msg.with_(body=None, body_ref=ref)
        if local_sender and not msg.bounce:
            copy = by_ref.to(LocalCopy, mailbox=msg.sender, folder="sent")
            out.send("local", msg.sender, copy.to_json())
        outgoing = msg if len(groups) == 1 else by_ref
        for domain, rcpts in groups.items():
            rec = outgoing.to(Delivery, recipients=rcpts, domain=domain)
            out.send("delivery", domain, rec.to_json())
        out.event(msg.id, "sent_folder", msg.recipients, {"sent_copy": local_sender, "dkim": dkim})
        return out

    stage.agent("clean", handle)
    return stage
