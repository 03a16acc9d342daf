"""Pure rules about mail: addresses, headers, size, routing. No I/O here.

Used by the ingress (to answer 4xx before anything enters Kafka) and by the
validator stage (which trusts nothing it reads from Kafka).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.utils import getaddresses
from functools import lru_cache
from typing import Any

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


# `validate_email` spends three quarters of its time on the domain (IDNA and UTS #46
# checks of every character): a fifth of the API's CPU under load, and a tenth of the
# validator stage's (py-spy, session 11, docs/BENCHMARKS.md). Addresses are many but
# their domains few, so the library's own domain check is given a cached copy of
# itself, as it calls it by its module-level name. It is a pure function of its
# arguments, its answer a dict the caller only reads; a refusal raises and is not cached.
# A new address on a known domain: 41 -> 12 µs. (The package's name ``validate_email`` is the function: the module is imported by path.)
_ev_module: Any = importlib.import_module("email_validator.validate_email")
if not hasattr(_ev_module.validate_email_domain_name, "cache_info"):
    _ev_module.validate_email_domain_name = lru_cache(maxsize=4096)(
        _ev_module.validate_email_domain_name)


class AddressError(ValueError):
    pass


# RFC 2047 §5: an encoded word never appears in an addr-spec; a receiver that
# decodes one anyway shows an address other than the one checked.
_ENCODED_WORD = re.compile(r"=\?[^?\s]*\?[bBqQ]\?[^?\s]*\?=")


@lru_cache(maxsize=65536)
def _validated(address: str) -> tuple[str, str]:
    """(the form to send, the Unicode form) of `address`, or AddressError."""
    if not isinstance(address, str) or not address or len(address) > 320:
        raise AddressError("not an email address")
    if bad_header_value(address):
        raise AddressError("control characters or line separators in address")
    if _ENCODED_WORD.search(address):
        raise AddressError("an RFC 2047 encoded word cannot be part of an address")
    try:
        v = validate_email(address, check_deliverability=False, allow_smtputf8=True,
                           allow_quoted_local=True, allow_domain_literal=False)
    except EmailNotValidError as exc:
        raise AddressError(str(exc)) from None
    # An address given in ASCII (an xn-- domain included) stays ASCII: turned into
    # Unicode it would need SMTPUTF8, which a receiver may not offer.
    sent = v.ascii_email if address.isascii() and v.ascii_email else v.normalized
    return sent, v.normalized


CACHED_FIELD_CHARS = 1024  # address fields up to this long are cached (`addresses`)


@lru_cache(maxsize=16384)
def _getaddresses(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple(getaddresses(list(values)))


def addresses(values: Iterable[str]) -> list[tuple[str, str]]:
    """``email.utils.getaddresses(values)``, cached: the API reads a submission's From
    field four times (its header checks, the envelope, the sender identity check) and
    a sender's every message has the same one; parsing them was a quarter of the
    API's CPU under load (docs/BENCHMARKS.md, session 10). Only short fields are
    cached: a client's long ones must not grow the API's memory."""
    values = tuple(values)
    if sum(len(v) for v in values) > CACHED_FIELD_CHARS:
        return getaddresses(list(values))
    return list(_getaddresses(values))


def normalize_address(address: str) -> str:
    """The address in normal form (domain lower-cased, IDNA checked), or AddressError.

    Internationalised local parts and domains are allowed (SMTPUTF8); an address
    given in ASCII keeps its ASCII (A-label) domain.
    """
    return _validated(address)[0]


def mailbox_key(address: str) -> str:
    """The mailbox `address` names: its normal form with the local part lower-cased.

    Our own domains match local parts case-insensitively (RFC 5321 lets the
    receiving domain decide; mail to ``VICTIM@x`` must reach, and be readable as,
    ``victim@x``), so deliveries, reads and mailbox tokens all key mailboxes by
    this. AddressError for anything that is not an address.
    """
    local, _, domain = _validated(address)[1].rpartition("@")  # x@xn--… is x@<U-label>
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


# Every line boundary str.splitlines() knows, which the email package splits
# header values on when it folds or parses them, plus NUL.
LINE_SEPARATORS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029\0"
_LINE_SEPARATOR = re.compile("[" + re.escape(LINE_SEPARATORS) + "]")


def bad_header_value(value: str) -> str | None:
    """Why a header value we are given cannot go into a message, or None."""
    if m := _LINE_SEPARATOR.search(value):
        if m.group() in "\r\n":
            return "contains CR or LF (header injection)"
        if m.group() == "\0":
            return "contains NUL"
        return f"contains a line separator (U+{ord(m.group()):04X})"
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


# A field line: a name of printable US-ASCII but ':' (RFC 5322 §3.6.8), then, in
# the obsolete syntax (§4.5), optional blanks, then the colon.
_FIELD_LINE = re.compile(rb"([\x21-\x39\x3b-\x7e]+)([ \t]*):")
# Fields a sender's identity is read from (checked against the credential).
IDENTITY_FIELDS = frozenset({"from", "sender", "resent-from", "resent-sender"})
# Fields holding addresses: their bytes must be UTF-8 and hold no encoded word.
ADDRESS_FIELDS = IDENTITY_FIELDS | {"to", "cc", "bcc", "reply-to", "resent-to", "resent-cc",
                                    "resent-bcc", "return-path", "errors-to", "disposition-notification-to"}
# RFC 5322 §3.6: at most one of each; two are read differently by different receivers.
SINGLE_FIELDS = frozenset({"from", "sender", "reply-to", "to", "cc", "subject", "date",
                           "message-id", "in-reply-to", "references"})


@dataclass(frozen=True)
class Field:
    """One header field as RFC 5322 reads it: `name` as written, `start`:`end` the
    byte span of its lines (continuations included) in the message."""

    name: str
    value: bytes
    start: int
    end: int


def header_fields(raw: bytes) -> tuple[list[Field], list[Problem]]:
    """The header section's fields, and every reason the section is ambiguous.

    One strict reading that agrees with RFC 5322, obsolete syntax included, about
    which lines are fields (``From : x`` is a From field), so that the sender
    checks see what every receiver sees. A section some reader could take
    differently is a problem: a line that is neither a field nor a continuation, a
    continuation with no field before it, blanks before a colon (obsolete syntax),
    a second From/To/Subject..., bytes in an address field that are not UTF-8, an
    encoded word (RFC 2047) where an address goes.
    """
    head = header_block(raw)
    fields: list[Field] = []
    problems: list[Problem] = []

    def problem(message: str, field: str = "headers") -> None:
        problems.append(Problem("bad_headers", message, field))

    pos = 0
    for number, line in enumerate(head.splitlines(keepends=True) if head else [], 1):
        start, pos = pos, pos + len(line)
        text = line.rstrip(b"\r\n")
        if text[:1] in (b" ", b"\t"):
            if not fields:
                problem("the header section starts with a continuation line")
                continue
            last = fields[-1]
            fields[-1] = Field(last.name, last.value + line, last.start, pos)
            continue
        m = _FIELD_LINE.match(text)
        if not m:
            shown = text[:40].decode("utf-8", "replace")
            problem(f"header line {number} ({shown!r}) is neither a field nor a continuation")
            continue
        name = m.group(1).decode()
        if m.group(2):
            problem(f"the {name} field has blanks before its colon (obsolete syntax): "
                    "receivers differ on it", _field_of(name.lower()))
        fields.append(Field(name, line[m.end():], start, pos))
    seen: dict[str, int] = {}
    for f in fields:
        key = f.name.lower()
        seen[key] = seen.get(key, 0) + 1
        if key in ADDRESS_FIELDS:
            try:
                value = f.value.decode("utf-8")
            except UnicodeDecodeError:
                problem(f"the {f.name} field is not valid UTF-8", _field_of(key))
                continue
            if any(_ENCODED_WORD.search(a) for _, a in addresses([value])):
                problem(f"the {f.name} field has an RFC 2047 encoded word inside an address",
                        _field_of(key))
    for key, count in seen.items():
        if count > 1 and key in SINGLE_FIELDS:
            problem(f"{count} {key.title()} fields: at most one is allowed", _field_of(key))
    return fields, problems


def _field_of(header: str) -> str:
    """The API field a header problem is reported under."""
    return "from" if header in IDENTITY_FIELDS else "to" if header in ("to", "cc", "bcc") else "headers"


class Headers:
    """A header section as email's compat32 parser reads it (`get`, `get_all`,
    ``[name]``, `items`: values with the folding kept, 8-bit text read as UTF-8 as RFC 6532
    wants), built from `header_fields`' one reading of it, which it keeps
    (`fields`, `problems`).

    email's parser took a quarter of the API's CPU per submission, and read the
    same bytes `header_fields` had read already (docs/BENCHMARKS.md, "Whole path,
    session 13"). Where `header_fields` finds no problem the two agree field for
    field (tests/mailflow/rules/test_mailrules.py compares them on generated
    sections); where it finds one, the message is refused for it.
    """

    __slots__ = ("fields", "problems", "_items")

    def __init__(self, fields: list[Field], problems: list[Problem]) -> None:
        self.fields = fields
        self.problems = problems
        self._items = [(f.name, f.value.decode("utf-8", "replace").lstrip(" \t").rstrip("\r\n"))
                       for f in fields]

    def get(self, name: str, failobj: Any = None) -> Any:
        key = name.lower()
        for n, v in self._items:
            if n.lower() == key:
                return v
        return failobj

    def __getitem__(self, name: str) -> Any:  # None when absent, as email's Message
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def get_all(self, name: str, failobj: Any = None) -> Any:
        key = name.lower()
        return [v for n, v in self._items if n.lower() == key] or failobj

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)


def parse_headers(raw: bytes) -> Headers:
    """The header section (`Headers`: `header_fields`' reading, with compat32's
    accessors)."""
    return Headers(*header_fields(raw))


def check_message(
    sender: str, recipients: list[str], raw: bytes, *, max_bytes: int, max_recipients: int,
    headers: Headers | None = None,
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
    problems += [p for p in headers.problems if not p.message.endswith("From fields: at most one is allowed")]
    from_values = headers.get_all("From") or []
    if len(from_values) != 1:
        problems.append(Problem("bad_from_header", "exactly one From header is required", "from"))
    elif not any(addr for _, addr in addresses(from_values)):
        problems.append(Problem("bad_from_header", "From header has no address", "from"))
    return problems


def summarize(raw: bytes, headers: Headers | None = None) -> dict[str, str | bool]:
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
