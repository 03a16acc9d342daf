"""RFC 8058 one-click unsubscribe: tokens, links and the two headers.

A JSON submission with ``"unsubscribe": true`` gets, per remote recipient, a link
``<MAILFLOW_PUBLIC_URL>/v1/unsubscribe/<token>``, made by the API at submission
(`links_for`) and carried in the record's ``meta.unsubscribe`` (recipient ->
link). The deliver stage sends each such recipient its own copy, with

    List-Unsubscribe: <https://PUBLIC/v1/unsubscribe/TOKEN>[, <mailto:ADDRESS?subject=unsubscribe>]
    List-Unsubscribe-Post: List-Unsubscribe=One-Click

prepended to the message (`with_unsubscribe_headers`), so a DKIM signature made
at sending covers them. The mailto link is there only when
``MAILFLOW_UNSUBSCRIBE_MAILTO`` names a mailbox that handles such requests
(mailflow receives no mail from outside itself).

The token is ``<payload>.<mac>``: `payload` the URL-safe base64 of
``<sender domain>\\n<recipient>``, `mac` the first 16 bytes (128 bits) of
HMAC-SHA256 under the server's unsubscribe secret, URL-safe base64. Nobody without
the secret can make or alter one; a forged token is answered 404.

The secret is ``MAILFLOW_UNSUBSCRIBE_SECRET`` when set (every API replica of a
deployment must share it), else 32 random bytes made on first use in
``<DATA_DIR>/secrets/unsubscribe.key`` (mode 0600). It is never logged, never on
Kafka, never in an answer. Rotating it voids every link already sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from mailflow import keyfile
from mailflow.config import Settings

HEADER_POST = b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
MAC_BYTES = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def secret(settings: Settings) -> bytes:
    """The server's unsubscribe secret (see the module docstring)."""
    return keyfile.key(settings, "unsubscribe", "MAILFLOW_UNSUBSCRIBE_SECRET")


def _mac(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, b"mailflow-unsubscribe-v1|" + payload.encode(), hashlib.sha256).digest()[:MAC_BYTES])


def make_token(key: bytes, sender_domain: str, recipient: str) -> str:
    payload = _b64(f"{sender_domain.lower()}\n{recipient.lower()}".encode())
    return f"{payload}.{_mac(key, payload)}"


def read_token(key: bytes, token: str) -> tuple[str, str] | None:
    """(sender domain, recipient) of a genuine token; None for anything else."""
    payload, dot, mac = token.partition(".")
    if not dot or not payload or not hmac.compare_digest(mac.encode(), _mac(key, payload).encode()):
        return None
    try:
        domain, nl, rcpt = _unb64(payload).decode().partition("\n")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return (domain, rcpt) if nl and domain and "@" in rcpt else None


def public_url(settings: Settings) -> str:
    """``MAILFLOW_PUBLIC_URL`` without a trailing slash; by default the API's own address."""
    url = os.environ.get("MAILFLOW_PUBLIC_URL", "")
    return (url or f"http://{settings.api_host}:{settings.api_port}").rstrip("/")


def links_for(settings: Settings, sender: str, recipients: list[str]) -> dict[str, str]:
    """recipient -> its ``List-Unsubscribe`` value, for each remote recipient."""
    key = secret(settings)
    domain = sender.rpartition("@")[2].lower()
    base = public_url(settings)
    mailto = os.environ.get("MAILFLOW_UNSUBSCRIBE_MAILTO", "").strip()
    if any(c in mailto for c in "<>,\r\n \t") or mailto.count("@") != 1:
        mailto = ""  # not one plain address: no mailto link rather than a broken header
    tail = f", <mailto:{mailto}?subject=unsubscribe>" if mailto else ""
    return {r: f"<{base}/v1/unsubscribe/{make_token(key, domain, r)}>{tail}"
            for r in recipients if not settings.is_local(r)}


def with_unsubscribe_headers(body: bytes, link: str | None) -> bytes:
    """`body` with the two RFC 8058 headers first (unchanged without a link)."""
    if not link:
        return body
    return b"List-Unsubscribe: " + link.encode() + b"\r\n" + HEADER_POST + body
