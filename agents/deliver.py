"""Delivery stage.

Input: ``delivery`` (key: recipient domain), one record per (message, domain).
Outputs: ``events`` (``delivered`` with the remote reply, ``deferred`` with the
attempt number and next attempt time, ``bounced``); ``retry.N`` (key: domain)
for temporary failures, the tier growing with each attempt; ``dead`` (key:
message id) for mail that can never go, with its history; a bounce (RFC 3464) to
the sender: into the sender's inbox (``local``) when the sender is ours, else
back through ``delivery`` with a null reverse-path. Never a bounce about a bounce.

Each recipient's final outcome is written to the ``ledger`` table and checked
before sending, so a record replayed after a crash or a rebalance does not reach
the same recipient twice. The ledger's changelog record is awaited (acks=all)
together with the record's events and retry/dead/bounce records, before the
input offset may be committed; copies of one (message, domain) record are
handled one at a time in a process (`serial_key`).

The window that remains is between the remote server's 250 (or its receipt of
the final dot, if the reply never reached us) and the broker's ack of the ledger
entry: one broker round trip, ~30 ms on the loaded 2-core test machine, longer
while a cluster loses a node. A worker killed -9 sends the mail that was inside
that window again; at most one message per actor (``concurrency=32``). Entries
are per recipient, each its own record: of two recipients of one transaction,
one entry can reach the broker before the kill and the other not (a cluster
chaos run: killed 390 ms after the 250), and only the second is sent again.
Measured by tests/pipeline/test_delivery.py
(2,000 messages, one of two replicas killed -9 mid-batch): 2, 21, 8 and 0
duplicates in four runs, every one delivered within 35 ms of the kill; before the
ledger write was awaited (and copies serialised): 11 in one run, including two
not caused by the kill window (two live copies of one record delivered at once).
SMTP itself is at-least-once here (RFC 1047); nothing short of the receiver's
cooperation closes the window.

Trust: the body goes out with the ``DKIM-Signature`` lines the sent-folder stage
made (``meta.dkim``), the same on every attempt; bounces made here are signed
(mailflow/mta/signing.py). TLS is checked against the MX host name (mailflow/mta/smtp.py),
and a recipient domain's MTA-STS policy may narrow the MX hosts and require
verified TLS (mailflow/mta/mtasts.py); ``delivered`` and ``deferred`` events say which
TLS was used.

Operators' queue actions (`mailflow queue`, mailflow/ops/queue.py) are read from
``queue.control`` (`ControlView`, read to its end before the first record): a
record whose message has a bounce request ends ``bounced`` (reason ``operator``)
with a report to the sender; a record held by domain or by id is not tried: it
goes to ``retry.hold`` with a ``held`` event, no attempt spent, and comes back
from the retry stage once released.

Settings read here (to move into ``mailflow.config`` later):
``MAILFLOW_MX_PORT`` (default 25), the TCP port used for destinations found by
MX lookup (and the implicit MX); routes in ``SMTP_ROUTES`` carry their own port.
Tests point it at an unprivileged port where a scripted peer listens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any

import faust
import orjson

from mailflow import metrics
from mailflow.config import Settings
from mailflow.ids import new_id
from mailflow.mta.dsn import FailedRecipient, build_dsn, is_bounce, parse_enhanced, status_for_reply
from mailflow.mta.mtasts import MtaSts
from mailflow.mta.mtasts import plan as sts_plan
from mailflow.mta.mx import PermanentDnsError, Resolver, TemporaryDnsError, route_for
from mailflow.mta.signing import Signer, wire_copies
from mailflow.mta.smtp import Pool
from mailflow.ops.queue import HOLD, OPERATOR_BOUNCE_REPLY, ControlView, bounce_requested, hold_of
from mailflow.rules.bounce_rules import DestinationBackoff, Verdict, classify, load_rules
from mailflow.rules.delivery import (
    DELIVERED,
    PERMANENT,
    TEMPORARY,
    Outcome,
    Shaper,
    expired,
    next_due,
    reply_class,
)
from mailflow.rules.mailrules import domain_of, header_block
from mailflow.suppression import TOPIC as SUPPRESSIONS
from mailflow.suppression import SuppressionList
from mailflow.suppression import entry as suppression_entry
from mailflow.suppression import key as suppression_key
from schemas.mail import DeadLetter, Delivery, Submission, parse_delivery
from streams.runtime import JSON_TABLE, Outputs, Stage, table_get

STAGE = "deliver"
log = logging.getLogger("mailflow.deliver")
MX_PORT = int(os.environ.get("MAILFLOW_MX_PORT", "25"))


def may_send(entry: dict[str, Any] | None, replayed_at: float | None) -> bool:
    """Whether a recipient is still to be tried, given its ledger entry and when the
    record was replayed (`RetryState.replayed_at`, None if never).

    Delivered is final for good. A permanent failure is final too, unless an
    operator replayed the message from ``dead`` after it (`mailflow replay`): then
    it is tried again, once per replay, since the new outcome updates the entry.
    """
    if entry is None:
        return True
    if entry.get("kind") == "permanent":
        return (replayed_at or 0.0) > float(entry.get("ts", 0))
    return False


def serial_key(raw: bytes | None) -> str | None:
    """The (message id, domain) of a ``delivery`` record: copies of one run one at a
    time in a process (`streams.runtime.Stage.process` says why).

    Called on every record before its handler, so it reads only the keys it needs
    instead of building the typed record a second time (no base64 decode of an
    inline body, no typed fields); the key is the one `Delivery.route_domain` gives.
    None for a record it cannot read: no lock, and the handler parks it."""
    try:
        obj = orjson.loads(raw or b"")
        meta = obj.get("meta") or {}
        domain = meta.get("domain") if isinstance(meta, dict) else None
        if not isinstance(domain, str) or not domain:
            domain = obj["recipients"][0].rpartition("@")[2].lower()
        return f"{obj['id']}|{domain}"
    except (orjson.JSONDecodeError, AttributeError, LookupError, TypeError):
        return None


def register(app: faust.App, settings: Settings) -> Stage:
    # No linger: the ledger entry's trip to the broker is the window in which a
    # kill -9 after the remote 250 means a second copy (see above).
    stage = Stage(app, settings, STAGE, linger_ms=0, serial_key=serial_key)
    ledger = app.Table("ledger", partitions=settings.partitions, schema=JSON_TABLE)
    pool = Pool(ehlo=settings.ehlo_name, timeout=settings.smtp_timeout, tls=settings.smtp_tls,
                max_per_host=settings.max_connections_per_host, ca_file=settings.tls_ca_file)
    resolver = Resolver(settings.dns)
    signer = Signer(settings)  # for the bounces made here; other mail comes signed
    mta_sts = (MtaSts(resolver, ca_file=settings.tls_ca_file, port=settings.mta_sts_port)
               if settings.mta_sts else None)
    shaper = Shaper(max_in_flight=settings.max_connections_per_host * 2, rate=settings.domain_rate)
    control = ControlView(settings)
    # One thread waits for the control topic's first read, however many actors wait on it.
    reading: list[asyncio.Future[Any]] = []

    def control_read() -> asyncio.Future[Any]:
        if not reading:
            reading.append(asyncio.ensure_future(asyncio.to_thread(control.ready.wait)))
        return reading[0]
    # Issue 16: replies classified by the rule table (mailflow/rules/bounce_rules.py),
    # destinations that rate-limit us paused, suppressed recipients never attempted.
    rules = load_rules()
    backoff = DestinationBackoff()
    suppressions = SuppressionList(settings)

    async def attempt(domain: str, msg: Delivery, rcpts: list[str], body: bytes) -> list[Outcome]:
        route = route_for(domain, settings.smtp_routes)
        try:
            dests = [route] if route else await resolver.destinations(domain, MX_PORT)
        except PermanentDnsError as exc:
            return [Outcome(r, PERMANENT, None, exc.reason) for r in rcpts]
        except TemporaryDnsError as exc:
            return [Outcome(r, TEMPORARY, None, exc.reason) for r in rcpts]
        # MTA-STS (mailflow/mta/mtasts.py): enforce keeps the MX hosts its policy names, TLS required.
        sts = sts_plan(domain, await mta_sts.policy(domain), dests) if mta_sts and not route else None
        if sts is not None:
            if sts.refused:
                return [Outcome(r, TEMPORARY, None, sts.refused, tls={"policy": "required", "version": None,
                                                                      "verified": False, "mta_sts": sts.mode})
                        for r in rcpts]
            dests = sts.hosts
        outcomes: list[Outcome] = [Outcome(r, TEMPORARY, None, "4.4.4 no reachable mail host") for r in rcpts]
        for dest in dests:  # every MX (and address) in order before the attempt fails
            try:
                # Routes may name hosts the system resolver knows; MX hosts are
                # resolved through the same DNS as the MX records.
                addrs = [dest.host] if route else await resolver.addresses(dest.host)
            except (PermanentDnsError, TemporaryDnsError) as exc:
                outcomes = [Outcome(r, TEMPORARY, None, f"{dest.host}: {exc.reason}") for r in rcpts]
                continue
            for addr in addrs:
                # The certificate is checked against the MX host name, never the address.
                outcomes = await pool.send(addr, dest.port, msg.sender, rcpts, body, server_name=dest.host,
                                           tls=sts.tls if sts else None, mta_sts=sts.mode if sts else None)
                if any(o.code is not None for o in outcomes):
                    return outcomes  # a server answered about the recipients: that is the result
        return outcomes

    async def handle(raw: bytes | None) -> Outputs:
        # Copies of one (message, domain) record never run at once here: the stage's
        # serial_key, held until this record's outputs are applied and acknowledged.
        msg = parse_delivery(raw)
        domain = msg.route_domain()
        out = stage.outputs()
        entries = {r: table_get(ledger, f"{msg.id}|{r}") for r in msg.recipients}
        todo = [r for r in msg.recipients if may_send(entries[r], msg.retry.replayed_at)]
        # Recipients the ledger says are finished get their final state again, never a
        # second send: after a replay (which reopened them in the status), and after a
        # crash between the ledger entry's ack and its events' (a chaos run left a
        # delivered message without its `delivered` event that way). The status
        # stage keeps the first final state; a repeat only joins the timeline.
        note = ("finished before this replay; not sent again" if msg.retry.replayed_at
                else "finished by an earlier copy of this record; not sent again")
        for r in (r for r in msg.recipients if r not in todo):
            entry = entries[r] or {}
            state = "delivered" if entry.get("kind") == DELIVERED else "bounced"
            out.event(msg.id, state, [r], {"reply": entry.get("reply"), "note": note}, sender=msg.sender)
        if not todo:
            return out
        if not control.ready.is_set():  # holds made before a restart apply to the first record
            await control_read()
        controls = control.controls()
        if msg.sender:  # a bounce (null sender) is never suppressed
            todo = await drop_suppressed(msg, todo, out)
            if not todo:
                return out
        now = time.time()
        first = msg.retry.first_attempt if msg.retry.first_attempt is not None else now
        if bounce_requested(controls, msg.id, msg.retry) is not None:
            outcomes = [Outcome(r, PERMANENT, None, OPERATOR_BOUNCE_REPLY) for r in todo]
            return await finish(out, msg, domain, outcomes, first, now, why="operator")
        hold = hold_of(controls, domain, msg.id)
        if hold is not None:
            return to_hold(out, msg, domain, todo, hold, now)
        if expired(first, now, settings.max_queue_age):
            last = msg.retry.last_error if msg.retry.last_error is not None else "no attempt succeeded"
            outcomes = [Outcome(r, PERMANENT, None, f"expired after {settings.max_queue_age:g}s; last error: {last}")
                        for r in todo]
            return await finish(out, msg, domain, outcomes, first, now, why="expired")
        if (until := backoff.paused(domain, now)) is not None:
            # The destination asked us to slow down: wait without spending an attempt.
            return to_retry(out, msg, domain, todo, first, now,
                            f"{domain} rate-limited us; paused until {until:.0f}",
                            count_attempt=False, klass="rate_limited")
        if not shaper.try_acquire(domain):
            # The destination is at its bound: step aside to the first retry tier
            # without spending an attempt, so the partition keeps moving.
            return to_retry(out, msg, domain, todo, first, now, "destination busy (shaped)",
                            count_attempt=False)
        try:
            body = await stage.body(msg)
            try:
                outcomes = await attempt_all(domain, msg, todo, body)
            except Exception as exc:  # never park mail on a fault of ours: defer it
                log.exception("deliver: attempt for %s failed", domain)
                outcomes = [Outcome(r, TEMPORARY, None, f"4.3.0 local error: {exc!r}") for r in todo]
        finally:
            shaper.release(domain)
        # The retry delay counts from the end of this attempt, not its start: an
        # attempt that took its whole SMTP timeout must not make the next one early.
        return await finish(out, msg, domain, outcomes, first, time.time())

    async def drop_suppressed(msg: Delivery, todo: list[str], out: Outputs) -> list[str]:
        """`todo` without the recipients on the sender domain's suppression list; each
        of those gets its final `suppressed` event (added to `out`), no SMTP."""
        await suppressions.ready()
        sender_domain = domain_of(msg.sender)
        left = []
        for r in todo:
            hit = suppressions.get(sender_domain, r)
            if hit is None or replayed_past(msg, hit):
                left.append(r)
                continue
            metrics.SMTP_REPLIES.labels("suppressed", "routed" if settings.smtp_routes else "mx").inc()
            out.event(msg.id, "suppressed", [r], {
                "reason": hit.get("reason"), "suppressed_at": hit.get("ts"),
                **({"reply": hit["reply"]} if hit.get("reply") else {})}, sender=msg.sender)
        return left

    def replayed_past(msg: Delivery, hit: dict[str, Any]) -> bool:
        """An operator replayed this very message after its own hard bounce suppressed
        the recipient (`mailflow replay dead`, after a fix): try it once more."""
        return (hit.get("reason") == "hard_bounce" and hit.get("message_id") == msg.id
                and (msg.retry.replayed_at or 0.0) > float(hit.get("ts", 0)))

    async def attempt_all(domain: str, msg: Delivery, rcpts: list[str], body: bytes) -> list[Outcome]:
        """One transaction for the record's recipients; one per recipient when the
        message has per-recipient headers (one-click unsubscribe: each its own link),
        each with the DKIM-Signature lines made once before the first attempt
        (sentfolder; `mailflow.mta.signing.wire_copies`)."""
        copies = wire_copies(msg.meta, body, rcpts)
        if len(copies) == 1:
            return await attempt(domain, msg, *copies[0])
        results = await asyncio.gather(*(attempt(domain, msg, rs, wire) for rs, wire in copies))
        return [o for outcomes in results for o in outcomes]

    def judge(o: Outcome, why: str) -> tuple[Outcome, Verdict | None]:
        """The outcome as the rule table decides it (retry or bounce), and the verdict."""
        if o.kind == DELIVERED:
            return o, None
        if why != "permanent":  # expired, or an operator's bounce: says nothing about the address
            return o, Verdict("soft", False, False, rule=why)
        v = classify(o.code, o.reply, o.kind == PERMANENT, rules)
        return dataclasses.replace(o, kind=TEMPORARY if v.retry else PERMANENT), v

    async def finish(out: Outputs, msg: Delivery, domain: str, outcomes: list[Outcome], first: float,
                     now: float, why: str = "permanent") -> Outputs:
        """`out` with the outcomes' ledger entries, events, retries and bounces."""
        judged = [judge(o, why) for o in outcomes]
        outcomes = [o for o, _ in judged]
        verdicts = {o.recipient: v for o, v in judged if v is not None}
        for o in outcomes:
            metrics.SMTP_REPLIES.labels(reply_class(o), "routed" if settings.smtp_routes else "mx").inc()
            if o.kind != TEMPORARY:
                # The runtime sends table writes before anything else: the record
                # that stops a second send.
                out.write(ledger, f"{msg.id}|{o.recipient}", {"kind": o.kind, "reply": o.reply, "ts": now})
        delivered = [o for o in outcomes if o.kind == DELIVERED]
        failed = [o for o in outcomes if o.kind == PERMANENT]
        temporary = [o for o in outcomes if o.kind == TEMPORARY]
        limited = [o for o in temporary if verdicts[o.recipient].klass == "rate_limited"]
        temporary = [o for o in temporary if o not in limited]
        for o in delivered:
            out.event(msg.id, "delivered", [o.recipient],
                      {"reply": o.reply, "host": o.host, **({"tls": o.tls} if o.tls else {})},
                      sender=msg.sender)
        if delivered and not limited:
            backoff.clear(domain)
        for o in delivered:
            # Delivered: the mailbox exists after all; a hard-bounce entry is wrong now
            # (an unsubscribe or an API entry is the person's or operator's, and stays).
            hit = suppressions.get(domain_of(msg.sender), o.recipient) if msg.sender else None
            if hit is not None and hit.get("reason") == "hard_bounce":
                out.send(SUPPRESSIONS, suppression_key(domain_of(msg.sender), o.recipient), None)
        for o in failed:
            if msg.sender and verdicts[o.recipient].suppress:
                suppress(out, msg, o, now)
        if failed:
            await bounce(out, msg, failed, first, now, why, {r: v.klass for r, v in verdicts.items()})
        if limited:
            backoff.pause(domain, max(verdicts[o.recipient].slow for o in limited), now)
            to_retry(out, msg, domain, [o.recipient for o in limited], first, now,
                     limited[0].reply, count_attempt=False, klass="rate_limited", tls=limited[0].tls)
        if temporary:
            reason = temporary[0].reply
            to_retry(out, msg, domain, [o.recipient for o in temporary], first, now, reason,
                     klass=verdicts[temporary[0].recipient].klass, tls=temporary[0].tls)
        return out

    def suppress(out: Outputs, msg: Delivery, o: Outcome, now: float) -> None:
        """Put a hard-bounced recipient on the sender domain's suppression list; this
        process knows the entry once the broker took it, before it reads it back."""
        rec = suppression_entry(domain_of(msg.sender), o.recipient, "hard_bounce", "deliver",
                                now, reply=o.reply, message_id=msg.id)
        out.send(SUPPRESSIONS, suppression_key(rec["domain"], rec["address"]), orjson.dumps(rec),
                 on_ack=lambda partition, offset: suppressions.remember(rec, partition, offset))

    def to_retry(out: Outputs, msg: Delivery, domain: str, rcpts: list[str], first: float, now: float,
                 reason: str, count_attempt: bool = True, klass: str | None = None,
                 tls: dict[str, Any] | None = None) -> Outputs:
        attempt_no = (msg.retry.attempt or 0) + (1 if count_attempt else 0)
        # A shaped step-aside is no failed attempt: always the first (shortest)
        # tier, however many attempts failed before.
        tier, due = next_due(now, max(1, attempt_no) if count_attempt else 1, settings.retry_schedule)
        history = msg.retry.add_history({"ts": now, "attempt": attempt_no, "error": reason})
        rec = msg.with_(recipients=rcpts, domain=domain, retry=msg.retry.with_(
            attempt=attempt_no, first_attempt=first, last_error=reason, due=due, tier=tier,
            history=history))
        metrics.RETRIES.labels(str(tier)).inc()
        out.event(msg.id, "deferred", rcpts, {"attempt": attempt_no, "next_attempt_at": due,
                                              "tier": tier, "error": reason,
                                              **({"class": klass} if klass else {}),
                                              **({"tls": tls} if tls else {})},
                  sender=msg.sender)
        out.send(f"retry.{tier}", domain, rec.to_json())
        return out

    def to_hold(out: Outputs, msg: Delivery, domain: str, rcpts: list[str], hold: dict[str, Any],
                now: float) -> Outputs:
        """Held by an operator: onto ``retry.hold`` untried, no attempt spent; `held_at`
        kept from an earlier hold pass (the time held does not count as queue age)."""
        by = "id" if "id" in hold else "domain"
        metrics.STAGE_MESSAGES.labels(STAGE, "held").inc()
        out.event(msg.id, "held", rcpts, {"hold": by, "value": hold.get(by), "since": hold["since"]})
        held = msg.with_(recipients=rcpts, domain=domain,
                         retry=msg.retry.with_(held_at=msg.retry.held_at or now))
        out.send(HOLD, domain, held.to_json())
        return out

    async def bounce(out: Outputs, msg: Delivery, failed: list[Outcome], first: float, now: float,
                     why: str, classes: dict[str, str] | None = None) -> None:
        """Final failures: ``bounced`` events, the ``dead`` record and a DSN. `why`:
        ``permanent`` (refused), ``expired`` (MAX_QUEUE_AGE) or ``operator``
        (`mailflow queue bounce`); `classes`: each recipient's reply class."""
        expired_ = why == "expired"
        rcpts = [o.recipient for o in failed]
        detail: dict[str, Any] = {"reply": failed[0].reply}
        if why != "permanent":
            detail["reason"] = why
        for o in failed:
            cls = (classes or {}).get(o.recipient)
            out.event(msg.id, "bounced", [o.recipient],
                      {**detail, "reply": o.reply, **({"class": cls} if cls else {})}, sender=msg.sender)
        body = await stage.body(msg)
        history = msg.retry.add_history({"ts": now, "failed": rcpts, "error": failed[0].reply})
        dead = msg.with_(recipients=rcpts, retry=msg.retry.with_(
            history=history, dead=DeadLetter(why, now, [o.__dict__ for o in failed])))
        out.send("dead", msg.id, dead.to_json())
        if is_bounce(msg.sender, header_block(body)):
            return  # never a bounce about a bounce
        dsn_id = new_id()
        dsn = build_dsn(
            original=body, envelope_from=msg.sender,
            failed=[FailedRecipient(
                address=o.recipient,
                status="4.4.7" if expired_ else status_for_reply(o.code, parse_enhanced(o.reply), False),
                diagnostic=o.reply, remote_mta=o.host,
                bounce_class=(classes or {}).get(o.recipient)) for o in failed],
            reporting_mta=settings.ehlo_name,
            postmaster=f"postmaster@{sorted(settings.local_domains)[0] if settings.local_domains else settings.ehlo_name}",
            message_id=f"<{dsn_id}@{settings.ehlo_name}>", date=datetime.now(UTC),
            arrival_date=datetime.fromtimestamp(msg.received_at, UTC),
        )
        dkim_header, _ = await signer.sign(dsn)
        bounce_msg = Submission(id=dsn_id, sender="", recipients=[msg.sender], received_at=now,
                                size=len(dsn), body=dsn, source="bounce", bounce=True,
                                bounce_of=msg.id,
                                dkim=dkim_header.decode("ascii") if dkim_header else None)
        out.event(dsn_id, "accepted", [msg.sender], {"bounce_of": msg.id}, sender="")
        if settings.is_local(msg.sender):
            # The validator's route for local mail: the sender's inbox.
            out.send("admitted", "", bounce_msg.to_json())
        else:
            rec = bounce_msg.to(Delivery, domain=domain_of(msg.sender))
            out.send("delivery", domain_of(msg.sender), rec.to_json())

    stage.agent("delivery", handle, mode="each", concurrency=32)
    return stage
