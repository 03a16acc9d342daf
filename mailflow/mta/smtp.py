"""SMTP at the edge (aiosmtplib): pooled connections and one transaction's outcome.

Connections are kept per destination (host, port) and reused for consecutive
messages, at most `max_per_host` at once, and closed after `idle` seconds unused.
`Pool.send` returns one `Outcome` per recipient; a failure before any reply about
the recipients (refused connection, reset, timeout, TLS) comes back as temporary
outcomes for all of them, with the reason.

TLS (STARTTLS, RFC 3207) follows a policy per call, the pool's by default:

* ``off``: never STARTTLS.
* ``opportunistic``: STARTTLS when offered (RFC 7435). The certificate is checked
  against the MX host name all the same, and the outcome says whether it
  verified; a certificate that does not verify still encrypts (a second
  handshake, without verification; the host is then remembered for an hour so
  that later connections skip the verified try).
* ``required``: STARTTLS must be offered and the certificate must verify for the
  MX host name (SNI and name check, RFC 6125) against the system's CAs plus
  ``MAILFLOW_TLS_CA_FILE``; else the attempt is temporary, with a reason naming
  what failed (expired, wrong name, unknown CA, not offered).

Every outcome carries ``tls``: the policy, the TLS version and cipher, whether the
certificate verified and, where not, why (see ``tls_summary``).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from dataclasses import dataclass, field, replace
from typing import Any

import aiosmtplib
import aiosmtplib.email
import aiosmtplib.smtp

from mailflow.mta import pipelining
from mailflow.rules.delivery import PERMANENT, TEMPORARY, Outcome, classify_code

TLS_POLICIES = ("off", "opportunistic", "required")
UNVERIFIED_MEMORY = 3600.0  # seconds a host whose certificate failed is not tried verified again

# aiosmtplib quotes every MAIL FROM and RCPT TO address through
# email.utils.parseaddr: a tenth of the deliver stage's CPU under load (py-spy,
# docs/BENCHMARKS.md, session 10). It is a pure function of the address, and the
# same addresses recur (a sender's every message, a recipient's retries), so its
# module-level name is given a cached copy of itself.
aiosmtplib.smtp.quote_address = functools.lru_cache(maxsize=16384)(aiosmtplib.email.quote_address)

# OpenSSL's X509_V_ERR_* codes a postmaster recognises, in words.
_VERIFY_WORDS = {
    9: "certificate not yet valid",
    10: "certificate expired",
    18: "self-signed certificate (unknown CA)",
    19: "self-signed certificate in chain (unknown CA)",
    20: "unknown CA (issuer not trusted)",
    21: "unknown CA (cannot verify the first certificate)",
    23: "certificate revoked",
    62: "wrong host name",
}


class TlsPolicyError(Exception):
    """TLS that the policy asks for could not be had; ``reason`` fits in a bounce or status."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def verify_failure(exc: ssl.SSLError, server_name: str) -> str:
    """Why a certificate did not verify for ``server_name``, in a postmaster's words.

    ``"4.7.5 TLS certificate of mx.example.com not verified: wrong host name
    (Hostname mismatch, certificate is not valid for 'mx.example.com'.)"``; the
    RFC 3463 status 4.7.5 is "cryptographic failure", temporary: the next attempt
    may meet a fixed certificate.
    """
    code = getattr(exc, "verify_code", None)
    detail = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc)
    words = _VERIFY_WORDS.get(code, "verification failed") if code is not None else "TLS handshake failed"
    return f"4.7.5 TLS certificate of {server_name} not verified: {words} ({detail})"


def tls_summary(policy: str, ssl_object: Any | None, verified: bool, reason: str | None = None,
                mta_sts: str | None = None) -> dict[str, Any]:
    """What the status timeline says about one connection's TLS.

    ``{"policy": "required", "version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384",
    "verified": true}``; without TLS ``version`` is None; ``reason`` says why an
    encrypted connection is not verified; ``mta_sts`` the recipient domain's MTA-STS
    mode where it has one.
    """
    out: dict[str, Any] = {"policy": policy, "version": None, "verified": False}
    if ssl_object is not None:
        cipher = ssl_object.cipher()
        out.update(version=ssl_object.version(), cipher=cipher[0] if cipher else None, verified=verified)
    if reason and not out["verified"]:
        out["reason"] = reason
    if mta_sts:
        out["mta_sts"] = mta_sts
    return out


@dataclass
class _HostPool:
    sem: asyncio.Semaphore
    # (connection, idle since, its TLS summary)
    idle: list[tuple[aiosmtplib.SMTP, float, dict[str, Any]]] = field(default_factory=list)


class Pool:
    """Pooled SMTP connections to destinations; see the module docstring for TLS.

    ``tls`` is the default policy (``MAILFLOW_SMTP_TLS``); ``ca_file`` a PEM file of
    CAs trusted besides the system's (``MAILFLOW_TLS_CA_FILE``), e.g. a private CA.
    """

    def __init__(self, *, ehlo: str, timeout: float = 30.0, tls: str = "opportunistic",
                 max_per_host: int = 8, idle: float = 10.0, ca_file: str = "") -> None:
        if tls not in TLS_POLICIES:
            raise ValueError(f"TLS policy must be one of {', '.join(TLS_POLICIES)}, not {tls!r}")
        self.ehlo, self.timeout, self.tls = ehlo, timeout, tls
        self.max_per_host, self.idle_seconds = max_per_host, idle
        self.hosts: dict[tuple[str, int, str, str], _HostPool] = {}
        # One context of each kind for every connection: building one loads the system's
        # CA bundle, which cost a tenth of the delivery stage's CPU when done per connection.
        self._verify_ctx = ssl.create_default_context()
        if ca_file:
            self._verify_ctx.load_verify_locations(cafile=ca_file)
        # Opportunistic TLS between MTAs may encrypt without authenticating the peer
        # (RFC 7435): the fallback when a certificate does not verify.
        self._plain_ctx = ssl.create_default_context()
        self._plain_ctx.check_hostname = False
        self._plain_ctx.verify_mode = ssl.CERT_NONE
        # server name -> (until when, why) for certificates that failed verification
        self._unverified: dict[str, tuple[float, str]] = {}
        self._reaper: asyncio.Task[None] | None = None

    def _host(self, key: tuple[str, int, str, str]) -> _HostPool:
        if key not in self.hosts:
            self.hosts[key] = _HostPool(asyncio.Semaphore(self.max_per_host))
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        return self.hosts[key]

    async def _open(self, host: str, port: int) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(hostname=host, port=port, timeout=self.timeout,
                               local_hostname=self.ehlo, start_tls=False, tls_context=self._plain_ctx)
        await smtp.connect()
        await smtp.ehlo()
        return smtp

    async def _starttls(self, smtp: aiosmtplib.SMTP, name: str, ctx: ssl.SSLContext) -> None:
        await smtp.starttls(server_hostname=name, tls_context=ctx)
        await smtp.ehlo()

    async def _connect(self, host: str, port: int, name: str, policy: str,
                       mta_sts: str | None = None) -> tuple[aiosmtplib.SMTP, dict[str, Any]]:
        """A connection to ``host:port`` whose TLS follows ``policy`` for the MX name ``name``."""
        smtp = await self._open(host, port)
        if policy == "off" or not smtp.supports_extension("starttls"):
            if policy == "required":
                smtp.close()
                raise TlsPolicyError(f"4.7.4 STARTTLS required by policy but not offered by {name}")
            return smtp, tls_summary(policy, None, False, mta_sts=mta_sts)
        now = time.monotonic()
        known_bad = self._unverified.get(name)
        if policy == "opportunistic" and known_bad and known_bad[0] > now:
            await self._starttls(smtp, name, self._plain_ctx)
            return smtp, tls_summary(policy, smtp.get_transport_info("ssl_object"), False, known_bad[1],
                                     mta_sts=mta_sts)
        try:
            await self._starttls(smtp, name, self._verify_ctx)
        except ssl.SSLError as exc:
            smtp.close()
            reason = verify_failure(exc, name)
            if policy == "required" or not isinstance(exc, ssl.SSLCertVerificationError):
                raise TlsPolicyError(reason) from None
            self._unverified[name] = (now + UNVERIFIED_MEMORY, reason)
            smtp = await self._open(host, port)  # that handshake is spent: encrypt anyway
            await self._starttls(smtp, name, self._plain_ctx)
            return smtp, tls_summary(policy, smtp.get_transport_info("ssl_object"), False, reason,
                                     mta_sts=mta_sts)
        self._unverified.pop(name, None)
        return smtp, tls_summary(policy, smtp.get_transport_info("ssl_object"), True, mta_sts=mta_sts)

    async def send(self, host: str, port: int, sender: str, rcpts: list[str], body: bytes, *,
                   server_name: str | None = None, tls: str | None = None,
                   mta_sts: str | None = None) -> list[Outcome]:
        """One transaction to ``host:port`` (an address or a name).

        ``server_name`` is the MX host name the certificate must name (SNI and
        name check), ``host`` by default; ``tls`` overrides the pool's policy for
        this call (MTA-STS ``enforce`` asks for ``required``); ``mta_sts`` is only
        reported in the outcomes' ``tls``.
        """
        name = server_name or host
        policy = tls or self.tls
        hp = self._host((host, port, name, policy))
        async with hp.sem:
            for attempt in (1, 2):
                reused = bool(hp.idle)
                try:
                    if reused:
                        smtp, _, info = hp.idle.pop()
                    else:
                        smtp, info = await self._connect(host, port, name, policy, mta_sts)
                except TlsPolicyError as exc:
                    return [Outcome(r, TEMPORARY, None, exc.reason, name,
                                    tls=tls_summary(policy, None, False, exc.reason, mta_sts)) for r in rcpts]
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    return [Outcome(r, TEMPORARY, None, f"connection to {host}:{port} failed: {exc}", host)
                            for r in rcpts]
                try:
                    outcomes = await self._transaction(smtp, host, sender, rcpts, body)
                except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
                    smtp.close()
                    if reused and attempt == 1:
                        continue  # the server dropped an idle connection: one fresh try
                    return [Outcome(r, TEMPORARY, None, f"{host} disconnected: {exc}", host) for r in rcpts]
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    smtp.close()
                    return [Outcome(r, TEMPORARY, None, f"{host}: {exc!r}", host) for r in rcpts]
                if smtp.is_connected:
                    hp.idle.append((smtp, time.monotonic(), info))
                return [replace(o, tls=info) for o in outcomes]
        raise AssertionError("unreachable")

    async def _transaction(self, smtp: aiosmtplib.SMTP, host: str, sender: str, rcpts: list[str],
                           body: bytes) -> list[Outcome]:
        limit = smtp.esmtp_extensions.get("size", "")
        if limit.isdigit() and int(limit) and len(body) > int(limit):
            return [Outcome(r, PERMANENT, 552, f"552 5.3.4 message of {len(body)} bytes exceeds "
                            f"{host}'s SIZE limit {limit}", host) for r in rcpts]
        options = []
        if not body.isascii() and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if not (sender + "".join(rcpts)).isascii():
            if not smtp.supports_extension("smtputf8"):
                # RFC 6531: an internationalised address cannot be downgraded.
                return [Outcome(r, PERMANENT, 553, f"553 5.6.7 {host} does not offer SMTPUTF8, "
                                "which this message's addresses need", host) for r in rcpts]
            options.append("SMTPUTF8")
        if smtp.supports_extension("pipelining"):
            replies = await pipelining.transaction(smtp, sender, rcpts, body, options, self.timeout)
            outcomes, reset = pipelined_outcomes(replies, rcpts, host)
            if reset:
                await _rset(smtp)
            return outcomes
        try:
            errors, reply = await smtp.sendmail(sender, rcpts, body, mail_options=options)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            await _rset(smtp)
            return [Outcome(e.recipient, classify_code(e.code), e.code, f"{e.code} {e.message}", host)
                    for e in exc.recipients]
        except aiosmtplib.SMTPResponseException as exc:
            # MAIL FROM or DATA refused: the reply is about every recipient.
            await _rset(smtp)
            if exc.code in (421,):
                smtp.close()
                raise aiosmtplib.SMTPServerDisconnected(f"{exc.code} {exc.message}") from None
            return [Outcome(r, classify_code(exc.code), exc.code, f"{exc.code} {exc.message}", host)
                    for r in rcpts]
        except aiosmtplib.SMTPNotSupported as exc:
            await _rset(smtp)
            return [Outcome(r, PERMANENT, 553, f"553 5.6.7 {exc}", host) for r in rcpts]
        out = []
        for r in rcpts:
            if r in errors:
                e = errors[r]
                out.append(Outcome(r, classify_code(e.code), e.code, f"{e.code} {e.message}", host))
            else:
                out.append(Outcome(r, "delivered", 250, reply, host))
        return out

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.idle_seconds / 2))
            now = time.monotonic()
            for hp in self.hosts.values():
                keep = []
                for smtp, since, info in hp.idle:
                    if now - since > self.idle_seconds:
                        try:
                            await asyncio.wait_for(smtp.quit(), 5)
                        except Exception:  # closing anyway
                            smtp.close()
                    else:
                        keep.append((smtp, since, info))
                hp.idle[:] = keep

    async def close(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        for hp in self.hosts.values():
            for smtp, _, _ in hp.idle:
                smtp.close()
            hp.idle.clear()


def pipelined_outcomes(replies: pipelining.Replies, rcpts: list[str], host: str
                       ) -> tuple[list[Outcome], bool]:
    """Each recipient's outcome from a pipelined transaction's replies (RFC 2920), as
    the unpipelined path (`Pool._transaction` through aiosmtplib) decides them, and
    whether the envelope needs an RSET. A 421 anywhere is the server closing:
    aiosmtplib's SMTPServerDisconnected, as a dropped connection."""
    said = [replies.mail, *replies.rcpts, *(r for r in (replies.data, replies.final) if r is not None)]
    closing = next((r for r in said if r.code == pipelining.CLOSING), None)
    if closing is not None:
        raise aiosmtplib.SMTPServerDisconnected(f"{closing.code} {closing.message}")

    def about_all(r: Any) -> list[Outcome]:
        return [Outcome(rc, classify_code(r.code), r.code, f"{r.code} {r.message}", host) for rc in rcpts]

    if replies.mail.code != 250:  # MAIL refused: the reply is about every recipient
        return about_all(replies.mail), True
    refused = {rc: r for rc, r in zip(rcpts, replies.rcpts, strict=True) if r.code not in (250, 251)}
    if len(refused) == len(rcpts):
        return [Outcome(rc, classify_code(r.code), r.code, f"{r.code} {r.message}", host)
                for rc, r in refused.items()], True
    data = replies.data
    if data is None or data.code != 354:
        return about_all(data or replies.mail), True
    final = replies.final
    if final is None or final.code != 250:
        return about_all(final or data), True
    return [Outcome(rc, classify_code(refused[rc].code), refused[rc].code,
                    f"{refused[rc].code} {refused[rc].message}", host) if rc in refused
            else Outcome(rc, "delivered", 250, final.message, host) for rc in rcpts], False


async def _rset(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.rset()
    except (aiosmtplib.SMTPException, OSError):
        smtp.close()
