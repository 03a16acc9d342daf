"""Mailbox index layout and the reads on it; pure apart from the mapping it is given.

A folder is an append-only list of message ids cut in pages of `PAGE` ids, so an
append rewrites one small page, never the whole folder:

    h|<mailbox>|<folder>         -> number of messages in the folder
    p|<mailbox>|<folder>|<page>  -> list of ids, oldest first
    m|<mailbox>|<folder>|<id>    -> the message's metadata

Listing is newest first; the cursor is the position to continue below.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import MutableMapping
from typing import Any

PAGE = 64
FOLDERS = ("inbox", "sent")
SEP = "\x1f"


def head_key(mailbox: str, folder: str) -> str:
    return SEP.join(("h", mailbox, folder))


def page_key(mailbox: str, folder: str, page: int) -> str:
    return SEP.join(("p", mailbox, folder, str(page)))


def meta_key(mailbox: str, folder: str, msg_id: str) -> str:
    return SEP.join(("m", mailbox, folder, msg_id))


def append(table: MutableMapping[str, Any], mailbox: str, folder: str, msg_id: str,
           meta: dict[str, Any]) -> bool:
    """Add a message to a folder once; False if it was listed already.

    The three writes (metadata, page, count) are not atomic: a worker killed between
    them leaves a torn append, and a replay of the same record repairs it. The
    metadata records the message's position, so "already there" means listed at that
    position, not merely present; a page holding ids past the count (page written,
    count not) is cut back to the count before the id is added.
    """
    mk = meta_key(mailbox, folder, msg_id)
    hk = head_key(mailbox, folder)
    count = table.get(hk) or 0
    old = table.get(mk)
    if old is not None and _listed_at(table, mailbox, folder, msg_id, old.get("pos"), count):
        return False
    pk = page_key(mailbox, folder, count // PAGE)
    ids = list(table.get(pk) or [])[: count % PAGE]
    ids.append(msg_id)
    # Metadata first: a crash between the writes leaves the message findable by id.
    table[mk] = {**meta, "pos": count}
    table[pk] = ids
    table[hk] = count + 1
    return True


def _listed_at(table: MutableMapping[str, Any], mailbox: str, folder: str, msg_id: str,
               pos: int | None, count: int) -> bool:
    if pos is None or pos >= count:
        return False
    page = table.get(page_key(mailbox, folder, pos // PAGE)) or []
    return pos % PAGE < len(page) and page[pos % PAGE] == msg_id


def list_ids(table: MutableMapping[str, Any], mailbox: str, folder: str, limit: int,
             cursor: int | None) -> tuple[list[str], int | None, int]:
    """(ids newest first, next cursor or None, total)."""
    total = table.get(head_key(mailbox, folder)) or 0
    end = total if cursor is None else max(0, min(cursor, total))
    start = max(0, end - limit)
    ids: list[str] = []
    page_no, page = -1, []
    for pos in range(end - 1, start - 1, -1):
        if pos // PAGE != page_no:
            page_no = pos // PAGE
            page = table.get(page_key(mailbox, folder, page_no)) or []
        if pos % PAGE < len(page):
            ids.append(page[pos % PAGE])
    return ids, (start if start > 0 else None), total


class LRU:
    """A small LRU cache for the hot path of recent listings."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.data: OrderedDict[Any, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Any) -> Any:
        if key in self.data:
            self.data.move_to_end(key)
            self.hits += 1
            return self.data[key]
        self.misses += 1
        return None

    def put(self, key: Any, value: Any) -> None:
        self.data[key] = value
        self.data.move_to_end(key)
        if len(self.data) > self.size:
            self.data.popitem(last=False)

    def drop_prefix(self, prefix: tuple[str, str]) -> None:
        for key in [k for k in self.data if k[:2] == prefix]:
            del self.data[key]


def parts(raw: bytes) -> dict[str, Any]:
    """A message's readable parts: text, html (as sent; the webmail sanitises it), attachments."""
    from email import message_from_bytes, policy

    msg = message_from_bytes(raw, policy=policy.default)
    text = html = None
    attachments = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        filename = part.get_filename()
        if filename or part.get_content_disposition() == "attachment":
            payload = part.get_payload(decode=True) or b""
            attachments.append({"filename": filename, "content_type": ctype, "size": len(payload)})
        elif ctype == "text/plain" and text is None:
            text = _content(part)
        elif ctype == "text/html" and html is None:
            html = _content(part)
    return {"text": text, "html": html, "attachments": attachments}


def _content(part: Any) -> str:
    try:
        return str(part.get_content())
    except (LookupError, ValueError):  # unknown charset: show what we can
        return (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
