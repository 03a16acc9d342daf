"""Pure rules about mail: addresses, headers, size, routing. No I/O here.

Used by the ingress (to answer 4xx before anything enters Kafka) and by the
validator stage (which trusts nothing it reads from Kafka).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import policy
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.message import Message
from email.parser import HeaderParser
from email.utils import getaddresses
from functools import lru_cache

import email_validator
from email_validator import EmailNotValidError, validate_email

MAX_LINE = 998  # RFC 5322 §2.1.1, without CRLF
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # printable US-ASCII except ':'

# email-validator assumes globally routable addresses and refuses special-use
# domains. A private MTA routes .local/.localhost/.test mail by SMTP_ROUTES and
# LOCAL_DOMAINS, so those are allowed (the library documents editing this list);
# .invalid, .onion and .arpa stay refused.
for _name in ("local", "localhost", "test"):
    if _name in email_validator.SPECIAL_USE_DOMAIN_NAMES:
        email_validator.SPECIAL_USE_DOMAIN_NAMES.remove(_name)


class AddressError(ValueError):
    pass


@lru_cache(maxsize=65536)
def normalize_address(address: str) -> str:
    """The address in normal form (domain lower-cased, IDNA checked), or AddressError.

    Internationalised local parts and domains are allowed (SMTPUTF8).
    """
    if not isinstance(address, str) or not address or len(address) > 320:
        raise AddressError("not an email address")
    if any(c in address for c in "\r\n\0"):
        raise AddressError("control characters in address")
    try:
        v = validate_email(address, check_deliverability=False, allow_smtputf8=True,
                           allow_quoted_local=True, allow_domain_literal=False)
    except EmailNotValidError as exc:
        raise AddressError(str(exc)) from None
    return v.normalized


def mailbox_key(address: str) -> str:
    """The mailbox `address` names: its normal form with the local part lower-cased.

    Our own domains match local parts case-insensitively (RFC 5321 lets the
    receiving domain decide; mail to ``VICTIM@x`` must reach, and be readable as,
    ``victim@x``), so deliveries, reads and mailbox tokens all key mailboxes by
    this. AddressError for anything that is not an address.
    """
    local, _, domain = normalize_address(address).rpartition("@")
    return f"{local.lower()}@{domain}"


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def split_recipients(recipients: list[str], local_domains: frozenset[str]) -> tuple[list[str], list[str]]:
    """(local, remote): local ones go to mailboxes, remote ones to `outgoing`."""
    local = [r for r in recipients if domain_of(r) in local_domains]
    remote = [r for r in recipients if domain_of(r) not in local_domains]
    return local, remote


def group_by_domain(recipients: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for r in recipients:
        groups.setdefault(domain_of(r), []).append(r)
    return groups


def bad_header_value(value: str) -> str | None:
    """Why a header value we are given cannot go into a message, or None."""
    if "\r" in value or "\n" in value:
        return "contains CR or LF (header injection)"
    if "\0" in value:
        return "contains NUL"
    if len(value) > 4 * MAX_LINE:
        return "is too long"
    return None


def bad_header_name(name: str) -> str | None:
    if not _HEADER_NAME.match(name) or len(name) > 76:
        return "is not a valid header name"
    return None


@dataclass(frozen=True)
class Problem:
    code: str  # machine-readable reason code
    message: str
    field: str | None = None


def header_block(raw: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i >= 0:
            return raw[:i]
    return raw


def parse_headers(raw: bytes) -> Message:
    """The header section, with 8-bit header text read as UTF-8 (RFC 6532).

    (The bytes parser would read it as ASCII with surrogate escapes, which turns
    an internationalised address into garbage.)
    """
    text = header_block(raw).decode("utf-8", "replace")
    return HeaderParser(policy=policy.compat32).parsestr(text + "\r\n\r\n")


def check_message(
    sender: str, recipients: list[str], raw: bytes, *, max_bytes: int, max_recipients: int,
    headers: Message | None = None,
) -> list[Problem]:
    """Every reason this message cannot be accepted; empty when it is fine.

    `headers`: `parse_headers(raw)`, when the caller has it already.
    """
    problems: list[Problem] = []
    if len(raw) > max_bytes:
        problems.append(Problem("too_large", f"message is {len(raw)} bytes, limit {max_bytes}", "size"))
    if sender:  # "" is the null reverse-path, allowed for bounces
        try:
            normalize_address(sender)
        except AddressError as exc:
            problems.append(Problem("bad_sender", f"sender: {exc}", "from"))
    if not recipients:
        problems.append(Problem("no_recipients", "no recipients", "to"))
    if len(recipients) > max_recipients:
        problems.append(Problem("too_many_recipients",
                                f"{len(recipients)} recipients, limit {max_recipients}", "to"))
    for r in recipients[: max_recipients + 1]:
        try:
            normalize_address(r)
        except AddressError as exc:
            problems.append(Problem("bad_recipient", f"recipient {r!r}: {exc}", "to"))
            break
    head = header_block(raw)
    for line in head.split(b"\n"):
        if len(line.rstrip(b"\r")) > MAX_LINE:
            problems.append(Problem("line_too_long", f"a header line exceeds {MAX_LINE} characters", "headers"))
            break
    if b"\r" in head.replace(b"\r\n", b""):
        problems.append(Problem("bare_cr", "a bare CR in the header section", "headers"))
    if b"\0" in head:
        problems.append(Problem("nul_in_headers", "NUL in the header section", "headers"))
    if headers is None:
        headers = parse_headers(raw)
    from_values = headers.get_all("From") or []
    if len(from_values) != 1:
        problems.append(Problem("bad_from_header", "exactly one From header is required", "from"))
    elif not any(addr for _, addr in getaddresses(from_values)):
        problems.append(Problem("bad_from_header", "From header has no address", "from"))
    if headers.defects:
        problems.append(Problem("bad_headers", f"malformed headers: {headers.defects[0]!r}", "headers"))
    return problems


def summarize(raw: bytes, headers: Message | None = None) -> dict[str, str | bool]:
    """What a mailbox listing shows of a message, from its headers alone.

    compat32 parsing plus RFC 2047 decoding: several times cheaper than the
    modern header registry, and this runs once per stored message.
    """
    if headers is None:
        headers = parse_headers(raw)

    def get(name: str) -> str:
        value = headers.get(name)
        if value is None:
            return ""
        try:
            return str(make_header(decode_header(str(value)))).replace("\r", "").replace("\n", "")
        except (HeaderParseError, LookupError, UnicodeDecodeError):
            return str(value)

    ctype = get("Content-Type").lower()
    return {
        "subject": get("Subject"), "from": get("From"), "to": get("To"), "cc": get("Cc"),
        "date": get("Date"), "message_id": get("Message-ID"),
        "has_attachments": ctype.startswith("multipart/mixed"),
    }
