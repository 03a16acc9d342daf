"""DKIM signing (RFC 6376, dkimpy): which headers, which keys, once per message.

``sign_message`` is the pure part: relaxed/relaxed, ``d=`` the From header's domain,
``h=`` every present header of ``SIGNED_HEADERS`` as often as it occurs, and From
once more (oversigned: nobody can add a second From that verifiers would show).
The message is signed as it goes on the wire: line endings made CRLF as aiosmtplib
sends them (the SMTP dot-stuffing is undone by the receiver, so it is not signed).

``Signer`` is the stage side: it follows the ``domains`` topic, opens the sealed
private keys with the operator key (``mailflow.mta.keyring``), and returns the
``DKIM-Signature`` header lines to put before the message, with a status detail.
The sent-folder stage keeps those lines in the record's ``meta["dkim"]`` and the
delivery stage puts them in front of the body for every attempt, so a retry sends
the very same bytes; bounces are signed where the delivery stage makes them.

``MAILFLOW_DKIM``: ``sign-if-key`` (default: mail from a domain without a key goes
unsigned, the status says so) or ``required`` (the API refuses such mail with 422
``dkim_key_missing`` naming the domain; a record that reaches the stage anyway is
parked on ``errors`` with that reason, to replay once the domain has a key).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import dkim

from mailflow.config import Settings
from mailflow.mta import domains as dom
from mailflow.mta.keyring import SealError, operator_key
from mailflow.rules.mailrules import addresses
from mailflow.rules.unsubscribe import with_unsubscribe_headers

log = logging.getLogger("mailflow.signing")

SIGNED_HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type",
                  "Content-Transfer-Encoding", "Reply-To", "List-Unsubscribe", "List-Unsubscribe-Post",
                  "Feedback-ID")
_WANTED = {h.lower() for h in SIGNED_HEADERS}
# aiosmtplib's own rule for line endings on the wire (CRLF, LF and lone CR become CRLF)
_LINE_ENDINGS = re.compile(rb"(?:\r\n|\n|\r(?!\n))")
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.M)
PENDING_RECHECK = 60.0  # seconds between DNS checks of a pending selector that did not resolve yet


def on_the_wire(message: bytes) -> bytes:
    return _LINE_ENDINGS.sub(b"\r\n", message)


def header_names(message: bytes) -> list[str]:
    """The field names of the header block, in order, repeats kept."""
    head = message.split(b"\r\n\r\n", 1)[0]
    return [m.group(1).decode("ascii", "replace") for m in _FIELD.finditer(head)]


def include_headers(names: list[str]) -> list[bytes]:
    """``h=``: each wanted header as many times as present, then From once more."""
    out = [n.lower().encode() for n in names if n.lower() in _WANTED]
    return [*out, b"from"] if b"from" in out else out


_FROM = re.compile(rb"^From[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.I | re.M)


def from_domain(message: bytes) -> str | None:
    """The domain of the (first) From address, lower-case A-labels; None without a usable one.

    Only the From field is parsed (a regular expression finds it in the header
    block): the whole header through the email package cost 0.6 ms a message.
    """
    head = re.split(rb"\r?\n\r?\n", message, maxsplit=1)[0]
    m = _FROM.search(head)
    if m is None:
        return None
    value = re.sub(rb"\r?\n", b"", m.group(1)).decode("utf-8", "replace")
    # `addresses` caches the parse (short fields only): a sender's every message has
    # the same From field, and parsing it was a tenth of the sent-folder stage's CPU.
    addrs = [a for _, a in addresses([value]) if "@" in a]
    if not addrs:
        return None
    try:
        return dom.normalize_domain(addrs[0].rpartition("@")[2])
    except dom.DomainError:
        return None


_dkimpy_rsa_sign = dkim.RSASSA_PKCS1_v1_5_sign
_OPENSSL_KEYS: dict[int, Any] = {}


def _openssl_rsa_sign(hash: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's RSASSA-PKCS1-v1_5 signature computed by OpenSSL (``cryptography``).

    dkimpy does the RSA arithmetic in Python: 15-30 ms per RSA-2048 signature on the
    test machine, more than the whole rest of a message's trip through a stage.
    PKCS#1 v1.5 signatures are deterministic, so OpenSSL's are the same bytes
    (tests/mailflow/mta/test_signing.py checks that against dkimpy's own); dkimpy still
    does the canonicalisation, hashing and header. Other hashes go to dkimpy.
    """
    if hash.name.lower() != "sha256":
        signature: bytes = _dkimpy_rsa_sign(hash, private_key)
        return signature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

    key = _OPENSSL_KEYS.get(private_key["modulus"])
    if key is None:
        pub = rsa.RSAPublicNumbers(private_key["publicExponent"], private_key["modulus"])
        key = rsa.RSAPrivateNumbers(
            private_key["prime1"], private_key["prime2"], private_key["privateExponent"],
            private_key["exponent1"], private_key["exponent2"], private_key["coefficient"], pub,
        ).private_key()
        _OPENSSL_KEYS[private_key["modulus"]] = key
    return key.sign(hash.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


# dkimpy's sign() calls this module-level name; the replacement gives the same bytes.
dkim.RSASSA_PKCS1_v1_5_sign = _openssl_rsa_sign


def sign_message(message: bytes, domain: str, keys: list[tuple[str, str, bytes]]) -> bytes:
    """The ``DKIM-Signature:`` lines (CRLF, folded) for ``message``, one per
    (selector, algorithm, private key), to put in front of it."""
    wire = on_the_wire(message)
    inc = include_headers(header_names(wire))
    out = b""
    for selector, algorithm, private in keys:
        out += dkim.sign(wire, selector.encode(), domain.encode(), private,
                         canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=algorithm.encode(),
                         include_headers=inc, linesep=b"\r\n")
    return out


def signing_keys(rec: dict[str, Any], published: set[str]) -> list[dict[str, Any]]:
    """The selectors that sign, one per algorithm: a pending one once ``published``
    (its record resolves), else the active one."""
    out = []
    for alg in (dom.RSA, dom.ED25519):
        sels = [s for s in rec["selectors"] if s["algorithm"] == alg]
        pending = [s for s in sels if s["state"] == "pending" and s["selector"] in published]
        active = [s for s in sels if s["state"] == "active"]
        pick = (pending or active)[-1:] if (pending or active) else []
        out += pick
    return out


class Signer:
    """Signs for every domain on the ``domains`` topic; one per stage process."""

    def __init__(self, settings: Settings, wait: float = 10.0) -> None:
        from streams.topics import full_name

        self.settings, self.mode = settings, settings.dkim
        self.topic = full_name(settings, dom.TOPIC)
        self._key = operator_key(settings)
        self._opened: dict[tuple[str, str], bytes] = {}
        self._published: dict[tuple[str, str], tuple[bool, float]] = {}
        self._res = dom.resolver(settings)
        self._reader = dom.follow(settings, wait)

    def record(self, domain: str) -> dict[str, Any] | None:
        rec: dict[str, Any] | None = self._reader.values[self.topic].get(domain)
        return rec

    async def _is_published(self, domain: str, sel: dict[str, Any]) -> bool:
        key = (domain, sel["selector"])
        seen = self._published.get(key)
        if seen and (seen[0] or time.monotonic() - seen[1] < PENDING_RECHECK):
            return seen[0]
        ok = await dom.selector_published(self._res, domain, sel)
        self._published[key] = (ok, time.monotonic())
        if ok:
            log.info("signing: %s selector %s resolves; signing with it", domain, sel["selector"])
        return ok

    def _private(self, rec: dict[str, Any], sel: dict[str, Any]) -> bytes:
        key = (rec["domain"], sel["selector"])
        if key not in self._opened:
            self._opened[key] = dom.private_key(self._key, rec, sel)
        return self._opened[key]

    async def sign(self, message: bytes) -> tuple[bytes, dict[str, Any]]:
        """(the DKIM-Signature lines or b"", the status detail) for ``message``.

        The detail is ``{"signed": true, "d": ..., "s": [selectors]}`` or
        ``{"signed": false, "domain": ..., "reason": ...}``; a missing key in
        ``required`` mode has ``"required": true`` (the caller parks the message).
        """
        domain = from_domain(message)
        if domain is None:
            return b"", {"signed": False, "reason": "no From domain to sign for"}
        rec = self.record(domain)
        if rec is None:
            return b"", {"signed": False, "domain": domain, "reason": f"no DKIM key for {domain}",
                         **({"required": True} if self.mode == "required" else {})}
        published = {s["selector"] for s in rec["selectors"]
                     if s["state"] == "pending" and await self._is_published(domain, s)}
        sels = signing_keys(rec, published)
        if not sels:
            return b"", {"signed": False, "domain": domain, "reason": f"{domain} has no active DKIM selector",
                         **({"required": True} if self.mode == "required" else {})}
        try:
            keys = [(s["selector"], s["algorithm"], self._private(rec, s)) for s in sels]
        except SealError as exc:
            log.error("signing: cannot open %s's DKIM key: %s", domain, exc)
            return b"", {"signed": False, "domain": domain, "reason": f"DKIM key of {domain} does not open",
                         **({"required": True} if self.mode == "required" else {})}
        header = sign_message(message, domain, keys)
        return header, {"signed": True, "d": domain, "s": [s["selector"] for s in sels]}

    def close(self) -> None:
        self._reader.close()


def signed_body(meta: dict[str, Any], body: bytes) -> bytes:
    """What goes on the wire: the record's DKIM-Signature lines, then the message."""
    header = meta.get("dkim")
    return header.encode("ascii") + body if header else body


def unsubscribe_links(meta: dict[str, Any]) -> dict[str, str]:
    """The record's one-click unsubscribe link per recipient (mailflow/rules/unsubscribe.py)."""
    links = meta.get("unsubscribe")
    return links if isinstance(links, dict) else {}


def wire_copies(meta: dict[str, Any], body: bytes, rcpts: list[str]) -> list[tuple[list[str], bytes]]:
    """The SMTP transactions for `rcpts`, each (recipients, bytes on the wire).

    One for all, with the record's DKIM-Signature lines; or, for a message with
    one-click unsubscribe links, one per recipient: its own ``List-Unsubscribe`` and
    ``List-Unsubscribe-Post`` first, under the signature the sent-folder stage made over
    them (``meta["dkim_rcpt"]``), so that receivers see the two headers signed (RFC 8058
    section 4 asks for it) and every attempt sends the same bytes."""
    links = unsubscribe_links(meta)
    if not links:
        return [(rcpts, signed_body(meta, body))]
    per = meta.get("dkim_rcpt") or {}
    out = []
    for r in rcpts:
        if links.get(r):
            header = per.get(r, "").encode("ascii")
            out.append(([r], header + with_unsubscribe_headers(body, links[r])))
        else:
            out.append(([r], signed_body(meta, body)))
    return out
