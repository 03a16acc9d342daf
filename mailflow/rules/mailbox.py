"""Mailbox index layout and the reads on it; pure apart from the mapping it is given.

A folder is an append-only list of message ids cut in pages of `PAGE` ids, so an
append rewrites one small page, never the whole folder:

    t|<mailbox>|<folder>         -> number of the folder's last page (absent: 0)
    p|<mailbox>|<folder>|<page>  -> list of ids, oldest first
    m|<mailbox>|<folder>|<id>    -> the message's metadata

The folder's size is ``last page * PAGE + len(last page)``, so an append writes the
metadata and one page, and the last-page number only when a new page starts: two
changelog records per append, not three. Folders written before this layout have
``h|<mailbox>|<folder>`` (the size) instead of ``t``; their next append writes ``t``.

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
    """The size of a folder written before the last-page layout."""
    return SEP.join(("h", mailbox, folder))


def tail_key(mailbox: str, folder: str) -> str:
    return SEP.join(("t", mailbox, folder))


def page_key(mailbox: str, folder: str, page: int) -> str:
    return SEP.join(("p", mailbox, folder, str(page)))


def meta_key(mailbox: str, folder: str, msg_id: str) -> str:
    return SEP.join(("m", mailbox, folder, msg_id))


def size(table: MutableMapping[str, Any], mailbox: str, folder: str) -> tuple[int, bool]:
    """(messages listed in the folder, whether it still has the old size key)."""
    last = table.get(tail_key(mailbox, folder))
    if last is None:
        old = table.get(head_key(mailbox, folder))
        if old is not None:
            return old, True
        last = 0
    return last * PAGE + len(table.get(page_key(mailbox, folder, last)) or []), False


def append(table: MutableMapping[str, Any], mailbox: str, folder: str, msg_id: str,
           meta: dict[str, Any]) -> bool:
    """Add a message to a folder once; False if it was listed already.

    The writes (metadata, last-page number when a page starts, page) are not
    atomic: a worker killed between them leaves a torn append, and a replay of the
    same record repairs it. The metadata records the message's position, so "already
    there" means listed at that position, not merely present. The page is written
    last, so until it is, the folder's size is what it was before.
    """
    mk = meta_key(mailbox, folder, msg_id)
    count, old_layout = size(table, mailbox, folder)
    old = table.get(mk)
    if old is not None and _listed_at(table, mailbox, folder, msg_id, old.get("pos"), count):
        return False
    pk = page_key(mailbox, folder, count // PAGE)
    # An old-layout page may hold ids past its size (page written, size not): cut.
    ids = list(table.get(pk) or [])[: count % PAGE]
    ids.append(msg_id)
    # Metadata first: a crash between the writes leaves the message findable by id.
    table[mk] = {**meta, "pos": count}
    if old_layout or (count and count % PAGE == 0):
        table[tail_key(mailbox, folder)] = count // PAGE
    table[pk] = ids
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
    total, _ = size(table, mailbox, folder)
    end = total if cursor is None else max(0, min(cursor, total))
    start = max(0, end - limit)
    ids: list[str] = []
    page_no, page = -1, list[str]()
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
    from email import message_from_bytes

    from mailflow.rules import mime

    msg = message_from_bytes(raw, policy=mime.DEFAULT)
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
