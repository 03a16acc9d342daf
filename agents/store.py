"""Mailbox store stage, and the mailbox reads.

Input: ``local`` (key: mailbox address), one record per (mailbox, folder).
Outputs: the ``mailboxes`` table (RocksDB via rocksdict, with its changelog topic,
so a killed worker comes back with its data); ``events`` (``stored`` for an inbox,
``sent_folder`` for a Sent copy).

Idempotent per (mailbox, folder, message id): a record processed twice after a
crash is listed once. The body is already in the object store (the validator put it
there); the table holds metadata only.

Reads (`GET /v1/mailboxes/{address}/messages[/{id}]`) are Faust web views routed
by the mailbox address to the replica that owns its partition, so they stay
correct with any number of replicas. Recent listings are served from an LRU in
front of the table; only this replica writes its partitions, so it invalidates
its own cache.
"""

from __future__ import annotations

import time
from typing import Any

import faust

from mailflow.config import Settings
from mailflow.ids import is_id
from mailflow.objstore import get_body
from mailflow.rules import mailbox as mb
from mailflow.rules.mailrules import AddressError, mailbox_key
from schemas.mail import parse_local
from streams.runtime import JSON_TABLE, Outputs, Stage

STAGE = "store"


def register(app: faust.App, settings: Settings) -> Stage:
    stage = Stage(app, settings, STAGE)
    table = app.Table("mailboxes", partitions=settings.partitions, schema=JSON_TABLE)
    cache = mb.LRU()

    async def handle(raw: bytes | None) -> Outputs:
        msg = parse_local(raw)  # PoisonPill without a mailbox, a folder and a body_ref
        meta = {
            "id": msg.id, "folder": msg.folder, "sender": msg.sender,
            "recipients": msg.recipients,
            "received_at": msg.received_at, "stored_at": time.time(), "size": msg.size,
            "body_ref": msg.body_ref, **(msg.summary or {}),
        }
        out = stage.outputs()
        # The runtime applies these writes to the table as soon as this returns, with
        # no wait in between: the next record of the mailbox reads them.
        if mb.append(out.writing(table), msg.mailbox, msg.folder, msg.id, meta):
            cache.drop_prefix((msg.mailbox, msg.folder))
        # The event is repeated on a replay; the status stage applies it once.
        if msg.folder == "inbox":
            # The recipients as addressed (the mailbox key may differ in case): the
            # status names recipients as they were submitted.
            out.event(msg.id, "stored", list(msg.recipients) or [msg.mailbox],
                      {"mailbox": msg.mailbox}, sender=msg.sender)
        else:
            out.event(msg.id, "sent_folder", [], {"mailbox": msg.mailbox})
        return out

    stage.agent("local", handle)

    def find(address: str, msg_id: str) -> dict[str, Any] | None:
        for folder in mb.FOLDERS:
            meta: dict[str, Any] | None = table.get(mb.meta_key(address, folder, msg_id))
            if meta is not None:
                return meta
        return None

    @app.page("/v1/mailboxes/{address}/messages")
    @app.table_route(table=table, match_info="address")
    async def list_messages(view: Any, request: Any, address: str) -> Any:
        if bad := _bad_request(view, address):
            return bad
        folder = request.query.get("folder", "inbox")
        if folder not in mb.FOLDERS:
            return _error(view, 400, "bad_folder", "folder must be inbox or sent", "folder")
        try:
            limit = int(request.query.get("limit", "50"))
            cursor = int(request.query["cursor"]) if request.query.get("cursor") else None
        except ValueError:
            return _error(view, 400, "bad_paging", "limit and cursor must be integers")
        if not 1 <= limit <= 500:
            return _error(view, 400, "bad_paging", "limit must be 1..500", "limit")
        key = (address, folder, limit, cursor)
        page = cache.get(key)
        if page is None:
            ids, next_cursor, total = mb.list_ids(table, address, folder, limit, cursor)
            items = [table.get(mb.meta_key(address, folder, i)) for i in ids]
            page = {"mailbox": address, "folder": folder, "total": total,
                    "messages": [_public(m) for m in items if m is not None],
                    "next_cursor": str(next_cursor) if next_cursor is not None else None}
            cache.put(key, page)
        return view.json(page)

    @app.page("/v1/mailboxes/{address}/messages/{msg_id}")
    @app.table_route(table=table, match_info="address")
    async def get_message(view: Any, request: Any, address: str, msg_id: str) -> Any:
        if bad := _bad_request(view, address, msg_id):
            return bad
        meta = find(address, msg_id)
        if meta is None:
            return _error(view, 404, "not_found", f"no message {msg_id} in {address}")
        out = _public(meta)
        out["body_ref"] = meta["body_ref"]  # the ingress reads /raw from the object store
        if request.query.get("parts", "1") != "0":
            out.update(mb.parts(await get_body(settings.object_store_url, meta["body_ref"])))
        return view.json(out)

    return stage


def _bad_request(view: Any, address: str, msg_id: str | None = None) -> Any:
    """The 400 for a path that names no mailbox (or message) as the ingress builds
    them; a second line of defence behind the ingress's own checks."""
    try:
        if mailbox_key(address) != address:
            raise AddressError("not in mailbox-key form")
    except AddressError:
        return _error(view, 400, "invalid_input", "not a mailbox address", "address")
    if msg_id is not None and not is_id(msg_id):
        return _error(view, 400, "invalid_input", "not a message id", "id")
    return None


def _public(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in ("body_ref", "pos")}


def _error(view: Any, status: int, code: str, message: str, field: str | None = None) -> Any:
    err: dict[str, Any] = {"code": code, "message": message}
    if field:
        err["fields"] = {field: message}  # the contract's error shape: field -> what is wrong
    return view.json({"error": err}, status=status)
