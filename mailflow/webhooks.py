"""Signed webhooks: records, signatures, secrets at rest, address rules, payloads.

A webhook is registered with ``POST /v1/webhooks`` ``{"url", "events": [...]}``
and lives on the compacted topic ``webhooks`` (key: its id). Its record names the
credential that made it (only that credential lists or deletes it) and the
senders whose mail it hears of: the credential's domains, or a mailbox token's own
address, as `Principal.may_read_status` decides for status reads.

Each delivery is a JSON POST signed with the webhook's secret::

    Mailflow-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>

(`sign`; a receiver checks it as `verify` does, and refuses old ``t`` to stop
replays). The secret is shown once, in the 201 answer. On the topic it is only
ever encrypted (AES-256-GCM, the webhook id as associated data) under the
webhook key: ``MAILFLOW_WEBHOOK_KEY`` when set (shared by the API and the
``webhooks`` stage of a deployment), else ``<DATA_DIR>/secrets/webhooks.key``
made on first use (`mailflow.keyfile`). Losing the key voids every secret:
webhooks must then be registered again.

URLs must be http(s) and resolve only to public addresses: private, loopback,
link-local, multicast and reserved ones are refused at registration and at every
delivery (the address connected to is the one checked, so DNS cannot swap it),
unless ``MAILFLOW_WEBHOOK_ALLOW_PRIVATE=true``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import orjson

from mailflow import keyfile
from mailflow.config import Settings, parse_duration
from schemas.states import FINAL

TOPIC = "webhooks"
# The states a webhook may ask for; "*" is every one.
EVENTS = ("accepted", "rate_limited", "rejected", "stored", "quarantined", "deferred", "delivered",
          "bounced", "suppressed")
MAX_URL = 2048
DEFAULT_SCHEDULE = "10s,1m,5m,15m,30m,1h,2h,4h"  # then every 4 h, until MAX_AGE
DEFAULT_MAX_AGE = "3d"


def allow_private() -> bool:
    return os.environ.get("MAILFLOW_WEBHOOK_ALLOW_PRIVATE", "false").strip().lower() in ("1", "true", "yes")


def retry_schedule() -> tuple[float, ...]:
    """The delay of each retry tier (``MAILFLOW_WEBHOOK_RETRY_SCHEDULE``)."""
    text = os.environ.get("MAILFLOW_WEBHOOK_RETRY_SCHEDULE", DEFAULT_SCHEDULE)
    return tuple(parse_duration(x) for x in text.split(",") if x.strip())


def max_age() -> float:
    """How long a delivery is retried before it is given up (``MAILFLOW_WEBHOOK_MAX_AGE``)."""
    return parse_duration(os.environ.get("MAILFLOW_WEBHOOK_MAX_AGE", DEFAULT_MAX_AGE))


# ---- signatures -------------------------------------------------------------------
def sign(secret: str, body: bytes, t: int | None = None) -> str:
    """The ``Mailflow-Signature`` header value for `body`."""
    t = int(time.time()) if t is None else t
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, body: bytes, header: str, tolerance: float = 300.0,
           now: float | None = None) -> bool:
    """What a receiver does: the signature matches and ``t`` is recent."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    want = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, parts.get("v1", ""))


# ---- secrets at rest ----------------------------------------------------------------
def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def _aead(settings: Settings) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    raw = keyfile.key(settings, "webhooks", "MAILFLOW_WEBHOOK_KEY")
    return AESGCM(hashlib.sha256(b"mailflow-webhooks-v1|" + raw).digest())


def seal(settings: Settings, webhook_id: str, secret: str) -> str:
    nonce = os.urandom(12)
    ct = _aead(settings).encrypt(nonce, secret.encode(), webhook_id.encode())
    return "v1:" + base64.b64encode(nonce + ct).decode()


def unseal(settings: Settings, webhook_id: str, sealed: str) -> str:
    """The secret; raises (cryptography's InvalidTag, ValueError) if it is not ours."""
    if not sealed.startswith("v1:"):
        raise ValueError("unknown secret format")
    data = base64.b64decode(sealed[3:])
    plain: bytes = _aead(settings).decrypt(data[:12], data[12:], webhook_id.encode())
    return plain.decode()


# ---- where webhooks may go --------------------------------------------------------
def address_allowed(ip: str, private_ok: bool = False) -> bool:
    """Whether a webhook may connect to `ip`: only public unicast addresses, unless
    private ones are allowed (loopback, RFC 1918, link-local, CGNAT, ULA ...)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified or addr.is_multicast:
        return False
    return private_ok or addr.is_global


def check_url(url: Any) -> tuple[str, int] | str:
    """(host, port) of a usable webhook URL, or why it is not usable (no DNS here)."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        return f"a URL of at most {MAX_URL} characters is required"
    if any(c.isspace() or ord(c) < 32 for c in url):
        return "no spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "an http:// or https:// URL with a host is required"
    if parts.username or parts.password:
        return "no credentials in the URL; the signature authenticates mailflow"
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def resolve_allowed(host: str, port: int, private_ok: bool) -> str | None:
    """None if every address `host` resolves to is allowed, else why not (blocking)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"{host} does not resolve: {exc}"
    bad = sorted({str(i[4][0]) for i in infos if not address_allowed(str(i[4][0]), private_ok)})
    if bad:
        return (f"{host} resolves to {bad[0]}, a private, loopback or link-local address "
                "(MAILFLOW_WEBHOOK_ALLOW_PRIVATE=true allows it)")
    return None


# ---- what is sent -------------------------------------------------------------------
def event_id(msg_id: str, recipient: str, state: str, ts: float) -> str:
    """Stable per state change: a final state once per recipient (so the copy a replayed
    stage writes again has the same id); any other state per its time."""
    basis = f"{msg_id}|{recipient}|{state}" + ("" if state in FINAL else f"|{ts:.6f}")
    return "ev_" + hashlib.sha256(basis.encode()).hexdigest()[:32]


def payload(ev: Any, recipient: str, sender: str) -> dict[str, Any]:
    """The JSON body about one recipient of one event (`schemas.records.Event`)."""
    d = ev.detail or {}
    return {
        "event_id": event_id(ev.id, recipient, ev.state, ev.ts),
        "message_id": ev.id, "sender": sender, "recipient": recipient, "state": ev.state,
        "reply": d.get("reply") or d.get("error") or d.get("reason"),
        "class": d.get("class"), "time": ev.ts,
        "detail": d,
    }


def matches(hook: dict[str, Any], state: str, sender: str, ts: float) -> bool:
    """Whether `hook` wants an event: its state, a sender it may hear of, and not
    from before it was made."""
    from mailflow.api.auth import Principal

    events = hook.get("events") or []
    if "*" not in events and state not in events:
        return False
    if ts < float(hook.get("created_at", 0)) - 5:
        return False
    scope = hook.get("scope") or {}
    who = Principal(id=str(hook.get("owner", "")), kind=str(scope.get("kind", "key")),
                    domains=tuple(scope.get("domains") or ()), address=str(scope.get("address", "")))
    return who.may_read_status(sender)


def job(hook_id: str, body: dict[str, Any], attempt: int, first: float, due: float,
        error: str = "") -> bytes:
    """A delivery waiting on a retry tier."""
    return orjson.dumps({"hook": hook_id, "body": body, "attempt": attempt, "first": first,
                         "due": due, "error": error})
