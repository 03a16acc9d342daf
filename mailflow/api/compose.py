"""Turning a submission into an RFC 5322 message, or into the list of what is wrong.

Pure functions: the JSON form becomes a MIME message (multipart when text, html
and attachments are combined); a raw ``message/rfc822`` submission keeps its bytes,
with only Message-ID and Date added when missing and Bcc lines taken out.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any

from mailflow.rules import mime
from mailflow.rules.mailrules import (
    AddressError,
    Field,
    addresses,
    bad_header_name,
    bad_header_value,
    header_block,
    normalize_address,
    parse_headers,
)

FIELDS = {"from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "headers", "attachments",
          "unsubscribe"}
# Set per recipient by mailflow with "unsubscribe": true (mailflow/rules/unsubscribe.py).
UNSUBSCRIBE_HEADERS = {"list-unsubscribe", "list-unsubscribe-post"}
# Headers the JSON form sets itself; a caller may not supply them through `headers`.
RESERVED = {"from", "to", "cc", "bcc", "reply-to", "subject", "message-id", "date", "sender",
            "mime-version", "content-type", "content-transfer-encoding", "received",
            "return-path", "content-disposition", "resent-from", "resent-sender",
            "authentication-results"}
# Fields a raw submission loses: Bcc (hidden recipients), and the trace fields only
# a receiving system adds (RFC 5321 §4.4 Return-Path; RFC 8601 Authentication-
# Results, which a receiver could otherwise take for its own verdict).
STRIPPED = frozenset({"bcc", "return-path", "authentication-results"})
_CTYPE = re.compile(r"^[a-zA-Z0-9!#$&^_.+-]+/[a-zA-Z0-9!#$&^_.+-]+$")


class InputError(ValueError):
    """Bad input: `fields` maps each bad field to what is wrong with it."""

    def __init__(self, fields: dict[str, str], code: str = "invalid_input") -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in fields.items()))
        self.fields = fields
        self.code = code


@dataclass
class Composed:
    sender: str  # envelope sender (normalised)
    recipients: list[str]  # envelope recipients, Bcc included, deduplicated
    raw: bytes
    header_from: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # A raw submission's parsed header block (Bcc still in it), kept so the sender
    # checks do not parse it a second time.
    headers: Any = None


def _addresses(value: Any, name: str, errors: dict[str, str]) -> list[tuple[str, str]]:
    """[(display name, normalised address)] from a string or a list of strings."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        errors[name] = "must be a string or a list of strings"
        return []
    out = []
    for item in items:
        why = bad_header_value(item)
        if why:
            errors[name] = f"{why}"
            return []
        for display, addr in addresses([item]):
            try:
                out.append((display, normalize_address(addr)))
            except AddressError as exc:
                errors[name] = f"{item!r} is not a valid address: {exc}"
                return []
    return out


def _addr(display: str, addr: str) -> Address:
    """`addr` (normalised) as a header address that writes back as exactly `addr`.

    `Address` quotes a local part that needs it itself, so a quoted one is given
    to it unquoted: quoted twice, the header would name another mailbox than the
    envelope.
    """
    local, _, domain = addr.rpartition("@")
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return Address(display_name=display, username=local, domain=domain)


def compose_json(doc: Any, *, message_id: str, date: Any, max_recipients: int) -> Composed:
    """A message from the JSON form; InputError naming every bad field."""
    if not isinstance(doc, dict):
        raise InputError({"body": "must be a JSON object"})
    errors: dict[str, str] = {}
    for unknown in sorted(set(doc) - FIELDS):
        errors[unknown] = "unknown field"
    sender = _addresses(doc.get("from"), "from", errors)
    if "from" not in errors and len(sender) != 1:
        errors["from"] = "exactly one sender address is required"
    to = _addresses(doc.get("to"), "to", errors)
    cc = _addresses(doc.get("cc"), "cc", errors)
    bcc = _addresses(doc.get("bcc"), "bcc", errors)
    reply_to = _addresses(doc.get("reply_to"), "reply_to", errors)
    recipients = list(dict.fromkeys(a for _, a in to + cc + bcc))
    if not recipients and not {"to", "cc", "bcc"} & errors.keys():
        errors["to"] = "at least one recipient (to, cc or bcc) is required"
    if len(recipients) > max_recipients:
        errors["to"] = f"{len(recipients)} recipients; at most {max_recipients}"
    for name in ("subject", "text", "html"):
        value = doc.get(name)
        if value is not None and not isinstance(value, str):
            errors[name] = "must be a string"
    subject = doc.get("subject") or ""
    if isinstance(subject, str) and (why := bad_header_value(subject)):
        errors["subject"] = why
    headers = doc.get("headers") or {}
    if not isinstance(headers, dict):
        errors["headers"] = "must be an object of header name to string value"
        headers = {}
    for hname, hvalue in headers.items():
        if why := bad_header_name(hname):
            errors[f"headers.{hname}"] = why
        elif hname.lower() in RESERVED:
            errors[f"headers.{hname}"] = "is set by mailflow or by its own field"
        elif doc.get("unsubscribe") is True and hname.lower() in UNSUBSCRIBE_HEADERS:
            errors[f"headers.{hname}"] = "is set per recipient by mailflow with unsubscribe: true"
        elif not isinstance(hvalue, str):
            errors[f"headers.{hname}"] = "must be a string"
        elif why := bad_header_value(hvalue):
            errors[f"headers.{hname}"] = why
    attachments = _attachments(doc.get("attachments"), errors)
    if doc.get("unsubscribe") is not None and not isinstance(doc.get("unsubscribe"), bool):
        errors["unsubscribe"] = "must be true or false"
    if doc.get("text") is None and doc.get("html") is None and not attachments and "text" not in errors:
        errors["text"] = "one of text, html or attachments is required"
    if errors:
        raise InputError(errors)

    msg = EmailMessage(policy=mime.SMTP)
    msg["From"] = _addr(*sender[0])
    if to:
        msg["To"] = [_addr(d, a) for d, a in to]
    if cc:
        msg["Cc"] = [_addr(d, a) for d, a in cc]
    if reply_to:
        msg["Reply-To"] = [_addr(d, a) for d, a in reply_to]
    if subject:
        msg["Subject"] = subject
    msg["Date"] = format_datetime(date)
    msg["Message-ID"] = message_id
    for hname, hvalue in headers.items():
        msg[hname] = hvalue
    text, html = doc.get("text"), doc.get("html")
    if text is not None:
        msg.set_content(text)
    if html is not None:
        if text is not None:
            msg.add_alternative(html, subtype="html")
        else:
            msg.set_content(html, subtype="html")
    for filename, ctype, data in attachments:
        maintype, _, subtype = ctype.partition("/")
        if msg.get_content_type() == "text/plain" and text is None and html is None:
            msg.set_content("")  # an attachment-only message still needs a first part
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    needs_utf8 = any(not a.isascii() for _, a in sender + to + cc + bcc + reply_to)
    raw = msg.as_bytes(policy=mime.SMTPUTF8 if needs_utf8 else mime.SMTP)
    return Composed(sender[0][1], recipients, raw, header_from=sender[0][1],
                    extra={"smtputf8": needs_utf8, "unsubscribe": doc.get("unsubscribe") is True})


def _attachments(value: Any, errors: dict[str, str]) -> list[tuple[str, str, bytes]]:
    if value is None:
        return []
    if not isinstance(value, list):
        errors["attachments"] = "must be a list"
        return []
    out = []
    for i, att in enumerate(value):
        name = f"attachments[{i}]"
        if not isinstance(att, dict):
            errors[name] = "must be an object with filename, content_type, content_base64"
            continue
        unknown = set(att) - {"filename", "content_type", "content_base64"}
        filename, ctype, data = att.get("filename"), att.get("content_type", "application/octet-stream"), att.get("content_base64")
        if unknown:
            errors[name] = f"unknown field(s) {', '.join(sorted(unknown))}"
        elif not isinstance(filename, str) or not filename or bad_header_value(filename):
            errors[f"{name}.filename"] = "a file name without control characters is required"
        elif not isinstance(ctype, str) or not _CTYPE.match(ctype):
            errors[f"{name}.content_type"] = "must be a media type such as application/pdf"
        elif not isinstance(data, str):
            errors[f"{name}.content_base64"] = "base64 text is required"
        else:
            try:
                out.append((filename, ctype.lower(), base64.b64decode(data, validate=True)))
            except (binascii.Error, ValueError):
                errors[f"{name}.content_base64"] = "is not valid base64"
    return out


def prepare_raw(raw: bytes, *, message_id: str, date: Any, env_from: str | None,
                env_to: list[str] | None, max_recipients: int) -> Composed:
    """A raw RFC 5322 submission: envelope from the query or the headers."""
    errors: dict[str, str] = {}
    head = header_block(raw)
    if not raw.strip() or head == raw and b":" not in raw:
        raise InputError({"body": "is not an RFC 5322 message"})
    headers = parse_headers(raw)
    fields = headers.fields
    if headers.problems:  # the sender checks below could read it otherwise than a receiver
        for p in headers.problems:
            errors[p.field or "headers"] = "; ".join(filter(None, (errors.get(p.field or "headers"), p.message)))
        raise InputError(errors, code="bad_headers")
    from_hdr = parseaddr(str(headers.get("From", "")))[1]
    sender_text = env_from if env_from is not None else from_hdr
    sender = ""
    try:
        sender = normalize_address(sender_text)
    except AddressError as exc:
        errors["from"] = f"no valid sender (From header or ?from=): {exc}"
    if env_to is None:
        env_to = [a for _, a in addresses([str(v) for n in ("To", "Cc", "Bcc")
                                            for v in headers.get_all(n) or []]) if a]
    recipients: list[str] = []
    for r in env_to:
        try:
            recipients.append(normalize_address(r))
        except AddressError as exc:
            errors["to"] = f"{r!r} is not a valid address: {exc}"
            break
    recipients = list(dict.fromkeys(recipients))
    if not recipients and "to" not in errors:
        errors["to"] = "no recipients (To/Cc/Bcc headers or ?to=)"
    if len(recipients) > max_recipients:
        errors["to"] = f"{len(recipients)} recipients; at most {max_recipients}"
    if errors:
        raise InputError(errors)
    eol = b"\r\n" if b"\r\n" in head else b"\n"
    added = b""
    if headers.get("Message-ID") is None:
        added += b"Message-ID: " + message_id.encode() + eol
    if headers.get("Date") is None:
        added += b"Date: " + format_datetime(date).encode() + eol
    body = _strip_fields(raw, [f for f in fields if f.name.lower() in STRIPPED])
    return Composed(sender, recipients, added + body, header_from=from_hdr, headers=headers)


def _strip_fields(raw: bytes, drop: list[Field]) -> bytes:
    """`raw` without the fields `drop` (from `header_fields(raw)`, continuations included)."""
    out, pos = [], 0
    for f in drop:
        out.append(raw[pos:f.start])
        pos = f.end
    # The last header line has no line end in its span (header_block cuts before
    # it): dropping that field must not leave the line end above it doubled into
    # the blank separator line, which would end the headers early.
    rest = raw[pos:]
    if drop and drop[-1].end == len(header_block(raw)) and out and out[-1].endswith((b"\r\n", b"\n")):
        rest = rest[2:] if rest.startswith(b"\r\n") else rest[1:] if rest.startswith(b"\n") else rest
    return b"".join(out) + rest
