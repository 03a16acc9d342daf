"""Bounces: delivery status notifications (RFC 3464) in a multipart/report (RFC 6522).

``build_dsn`` writes the bounce the sender gets when recipients fail for good;
``is_bounce`` keeps the delivery stage from ever bouncing a bounce (mail loops);
``status_for_reply`` / ``parse_enhanced`` turn an SMTP reply into the RFC 3463
status code a DSN carries.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.utils import format_datetime

from mailflow.rules import mime

__all__ = [
    "EXPIRED_STATUS",
    "FailedRecipient",
    "build_dsn",
    "flatten_reply",
    "is_bounce",
    "parse_enhanced",
    "split_headers",
    "status_for_reply",
]

# RFC 3463 X.4.7 "Delivery time expired": a persistent transient failure, so the
# class stays 4 even in a DSN whose Action is "failed" (Postfix does the same).
EXPIRED_STATUS = "4.4.7"

SUBJECT = "Undelivered Mail Returned to Sender"
_ENHANCED = re.compile(r"^\s*(?:[245]\d\d[ -]\s*)?([245])\.(\d{1,3})\.(\d{1,3})(?!\S)")
_CONTINUATION = re.compile(r"^([245]\d\d)[ -]")
_COMMENT = re.compile(r"\([^()]*\)")  # RFC 5322 comment (not nested)
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_REPORT_TYPES = ("delivery-status", "global-delivery-status")


@dataclass
class FailedRecipient:
    address: str
    status: str  # RFC 3463 code, e.g. "5.1.1"
    action: str = "failed"
    diagnostic: str = ""  # the remote reply, e.g. "550 5.1.1 user unknown"
    remote_mta: str | None = None
    # mailflow's class of the reply (mailflow/rules/bounce_rules.py: hard, policy,
    # mailbox_full ...), written as the extension field X-Mailflow-Bounce-Class.
    bounce_class: str | None = None


# --------------------------------------------------------------------------- status codes


def parse_enhanced(text: str) -> str | None:
    """The RFC 3463 code in a reply such as ``"550 5.1.1 user unknown"`` or ``"5.1.10 null MX"``.

    Only the first line counts (multi-line replies repeat it); None if absent."""
    if not text:
        return None
    m = _ENHANCED.match(text.splitlines()[0])
    if not m:
        return None
    return ".".join(str(int(part)) for part in m.groups())


def status_for_reply(code: int | None, enhanced: str | None, temporary: bool) -> str:
    """The Status of a failed recipient's DSN block.

    * The reply's enhanced code when it has one (its class corrected to agree
      with the reply code, as RFC 2034 requires of servers);
    * else for mail given up after temporary failures (``temporary``: the queue
      lifetime expired) ``4.4.7``, RFC 3463's "delivery time expired";
    * else from the basic reply code: 5xx -> ``5.0.0``, 4xx -> ``4.0.0``; no
      reply at all (nothing answered) -> ``5.0.0``, or ``4.4.7`` if temporary.
    """
    if enhanced and _STATUS.match(enhanced):
        if code is not None and str(code)[:1] in "45" and enhanced[0] != str(code)[0]:
            return str(code)[0] + enhanced[1:]
        return enhanced
    if temporary:
        return EXPIRED_STATUS
    if code is not None and 400 <= code < 500:
        return "4.0.0"
    return "5.0.0"


# --------------------------------------------------------------------------- bounce detection


def is_bounce(envelope_from: str, raw_headers: bytes) -> bool:
    """True if a message must never be bounced: it is a bounce or an automatic reply.

    That is the null reverse-path (``""``/``"<>"``), a multipart/report of
    delivery status, or ``Auto-Submitted`` other than ``no`` (RFC 3834)."""
    if envelope_from.strip() in ("", "<>"):
        return True
    try:
        headers = BytesHeaderParser(policy=policy.compat32).parsebytes(
            split_headers(raw_headers)[0]
        )
    except Exception:  # unparseable headers: not provably a bounce
        return False
    if headers.get_content_type() == "multipart/report":
        report_type = str(headers.get_param("report-type", "") or "").strip().lower()
        if report_type in _REPORT_TYPES:
            return True
    for value in headers.get_all("Auto-Submitted", []):
        keyword = _COMMENT.sub(" ", str(value)).split(";", 1)[0].strip().lower()
        if keyword and keyword != "no":
            return True
    return False


# --------------------------------------------------------------------------- building a DSN


def split_headers(raw: bytes) -> tuple[bytes, bytes]:
    """(header block with its line ends, body) at the first empty line of ``raw``."""
    ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := raw.find(sep)) >= 0]
    if raw.startswith((b"\r\n", b"\n")):  # no headers at all
        return b"", raw.split(b"\n", 1)[1]
    if not ends:
        return raw, b""
    i, n = min(ends)
    return raw[: i + n // 2], raw[i + n :]


def _one_line(text: str) -> str:
    """Header-safe: remote replies are multi-line and untrusted (no CR/LF injection)."""
    return " ".join(text.split())


def flatten_reply(text: str) -> str:
    """A multi-line SMTP reply as one line: ``"550-5.1.1 a\\r\\n550 5.1.1 b"`` -> ``"550 5.1.1 a b"``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    head = _CONTINUATION.match(lines[0])
    words = [lines[0] if head is None else f"{head.group(1)} {lines[0][4:].strip()}"]
    for line in lines[1:]:
        m = _CONTINUATION.match(line)
        rest = line[4:].strip() if m else line
        status = parse_enhanced(lines[0])
        if status and rest.split(" ", 1)[0] == status:
            rest = rest[len(status) :].strip()
        words.append(rest)
    return _one_line(" ".join(words))


def _bare_address(envelope_from: str) -> str:
    text = envelope_from.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text


def _fields(pairs: list[tuple[str, str]]) -> Message:
    """One block of a message/delivery-status body (a header-only Message)."""
    block = Message(policy=mime.SMTP)
    for name, value in pairs:
        block[name] = value
    return block


def _explanation(failed: list[FailedRecipient], reporting_mta: str, subject: str) -> str:
    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "I'm sorry to have to inform you that your message could not be delivered",
        "to one or more recipients. It is attached below.",
        "",
        "For further assistance, please contact the postmaster of this system.",
        "",
    ]
    if subject:
        lines += [f"Subject of your message: {subject}", ""]
    for rcpt in failed:
        reply = flatten_reply(rcpt.diagnostic) or f"delivery failed (status {rcpt.status})"
        where = f"host {rcpt.remote_mta} said: " if rcpt.remote_mta else ""
        lines += textwrap.wrap(
            f"<{rcpt.address}>: {where}{reply}", width=76, subsequent_indent="    "
        )
    return "\n".join(lines) + "\n"


def build_dsn(
    *,
    original: bytes,
    envelope_from: str,
    failed: list[FailedRecipient],
    reporting_mta: str,
    postmaster: str,
    message_id: str,
    date: datetime,
    arrival_date: datetime | None = None,
    original_envelope_id: str | None = None,
) -> bytes:
    """A complete bounce (CRLF line ends) to ``envelope_from`` about ``failed``.

    Three parts: a human explanation, the machine-readable delivery status, and
    the original's headers only -- not its body, so a bounce never carries the
    content (or malware) back and stays small.  The caller sends it with the
    null reverse-path (``MAIL FROM:<>``) so that it cannot itself bounce."""
    to = _bare_address(envelope_from)
    if not to:
        raise ValueError("no bounce to the null reverse-path (that would bounce a bounce)")
    if not failed:
        raise ValueError("a DSN needs at least one failed recipient")
    for rcpt in failed:
        if not _STATUS.match(rcpt.status):
            raise ValueError(f"bad RFC 3463 status {rcpt.status!r} for {rcpt.address}")
    headers_raw, _body = split_headers(original)
    orig = BytesHeaderParser(policy=policy.compat32).parsebytes(headers_raw)

    msg = EmailMessage(policy=mime.SMTP)
    msg["From"] = Address("Mail Delivery System", addr_spec=postmaster)
    msg["To"] = to
    msg["Subject"] = SUBJECT
    msg["Date"] = format_datetime(date)
    msg["Message-ID"] = message_id
    orig_id = _one_line(str(orig.get("Message-ID", "")))
    if orig_id:
        msg["In-Reply-To"] = orig_id
        msg["References"] = orig_id
    msg["Auto-Submitted"] = "auto-replied"
    msg["MIME-Version"] = "1.0"
    msg.add_header("Content-Type", "multipart/report", report_type="delivery-status")

    notice = EmailMessage(policy=mime.SMTP)
    subject = _one_line(str(orig.get("Subject", "")))
    notice.set_content(_explanation(failed, reporting_mta, subject))
    del notice["MIME-Version"]  # set_content adds it; only the top level needs it
    notice["Content-Description"] = "Notification"
    msg.attach(notice)

    per_message = []
    if original_envelope_id:
        per_message.append(("Original-Envelope-Id", _one_line(original_envelope_id)))
    per_message.append(("Reporting-MTA", f"dns; {reporting_mta}"))
    if arrival_date is not None:
        per_message.append(("Arrival-Date", format_datetime(arrival_date)))
    blocks: list[Message | str] = [_fields(per_message)]
    for rcpt in failed:
        fields = [
            ("Final-Recipient", f"rfc822; {_one_line(rcpt.address)}"),
            ("Action", rcpt.action),
            ("Status", rcpt.status),
        ]
        if rcpt.remote_mta:
            fields.append(("Remote-MTA", f"dns; {_one_line(rcpt.remote_mta)}"))
        if rcpt.diagnostic.strip():
            fields.append(("Diagnostic-Code", f"smtp; {flatten_reply(rcpt.diagnostic)}"))
        if rcpt.bounce_class:
            fields.append(("X-Mailflow-Bounce-Class", _one_line(rcpt.bounce_class)))
        blocks.append(_fields(fields))
    status = EmailMessage(policy=mime.SMTP)
    status["Content-Type"] = "message/delivery-status"
    status["Content-Description"] = "Delivery report"
    status.set_payload(blocks)
    msg.attach(status)

    # The original header block as it was, re-wrapped only for line ends.
    text = headers_raw.decode("utf-8", errors="replace").replace("\r\n", "\n").rstrip("\n")
    returned = EmailMessage(policy=mime.SMTP)
    returned.set_content(
        text + "\n",
        subtype="rfc822-headers",
        cte="7bit" if text.isascii() else "8bit",
    )
    del returned["MIME-Version"]
    returned["Content-Description"] = "Undelivered Message Headers"
    msg.attach(returned)
    return msg.as_bytes()
