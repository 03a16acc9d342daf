"""SMTP at the edge (aiosmtplib): pooled connections and one transaction's outcome.

Connections are kept per destination (host, port) and reused for consecutive
messages, at most `max_per_host` at once, and closed after `idle` seconds unused.
`Pool.send` returns one `Outcome` per recipient; a failure before any reply about
the recipients (refused connection, reset, timeout, TLS) comes back as temporary
outcomes for all of them, with the reason.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field

import aiosmtplib

from mailflow.delivery import PERMANENT, TEMPORARY, Outcome, classify_code


@dataclass
class _HostPool:
    sem: asyncio.Semaphore
    idle: list[tuple[aiosmtplib.SMTP, float]] = field(default_factory=list)


class Pool:
    def __init__(self, *, ehlo: str, timeout: float = 30.0, tls: str = "opportunistic",
                 max_per_host: int = 8, idle: float = 10.0) -> None:
        self.ehlo, self.timeout, self.tls = ehlo, timeout, tls
        self.max_per_host, self.idle_seconds = max_per_host, idle
        self.hosts: dict[tuple[str, int], _HostPool] = {}
        # One TLS context for every connection: building one loads the system's CA
        # bundle, which cost a tenth of the delivery stage's CPU when done per connection.
        self._tls_ctx = ssl.create_default_context()
        if tls != "required":
            # Opportunistic TLS between MTAs encrypts without authenticating the
            # peer (RFC 7435); only a `required` policy verifies certificates.
            self._tls_ctx.check_hostname = False
            self._tls_ctx.verify_mode = ssl.CERT_NONE
        self._reaper: asyncio.Task[None] | None = None

    def _host(self, key: tuple[str, int]) -> _HostPool:
        if key not in self.hosts:
            self.hosts[key] = _HostPool(asyncio.Semaphore(self.max_per_host))
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        return self.hosts[key]

    async def _connect(self, host: str, port: int) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(hostname=host, port=port, timeout=self.timeout,
                               local_hostname=self.ehlo, start_tls=False, tls_context=self._tls_ctx)
        await smtp.connect()
        await smtp.ehlo()
        if self.tls != "off" and smtp.supports_extension("starttls"):
            await smtp.starttls()
            await smtp.ehlo()
        elif self.tls == "required":
            smtp.close()
            raise aiosmtplib.SMTPException("STARTTLS required by policy but not offered")
        return smtp

    async def send(self, host: str, port: int, sender: str, rcpts: list[str], body: bytes) -> list[Outcome]:
        hp = self._host((host, port))
        async with hp.sem:
            for attempt in (1, 2):
                reused = bool(hp.idle)
                try:
                    smtp = hp.idle.pop()[0] if reused else await self._connect(host, port)
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
                    hp.idle.append((smtp, time.monotonic()))
                return outcomes
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
                for smtp, since in hp.idle:
                    if now - since > self.idle_seconds:
                        try:
                            await asyncio.wait_for(smtp.quit(), 5)
                        except Exception:  # closing anyway
                            smtp.close()
                    else:
                        keep.append((smtp, since))
                hp.idle[:] = keep

    async def close(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        for hp in self.hosts.values():
            for smtp, _ in hp.idle:
                smtp.close()
            hp.idle.clear()


async def _rset(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.rset()
    except (aiosmtplib.SMTPException, OSError):
        smtp.close()
