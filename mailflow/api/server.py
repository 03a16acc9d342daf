"""The HTTP ingress (aiohttp): `mailflow api`.

``POST /v1/messages`` answers 202 only once Kafka acknowledged the submission
(acks=all, idempotent producer); bad input gets a 4xx naming each bad field and
nothing enters Kafka; a broker that is down gets 503 and nothing half-accepted
(a claim-checked body written before the failed send is deleted again).

Reads are routed to the stage that owns the data: status to the ``status`` stage,
mailboxes to the ``store`` stage, found through the compacted ``registry`` topic.

Every ``/v1`` request carries ``Authorization: Bearer <API key or mailbox token>``
(see mailflow/api/auth.py; ``MAILFLOW_AUTH=off`` turns this off for local
experiments): 401 without a valid one, 403 when it may not send as the message's
sender or From address, or read that mailbox or message status.

``Idempotency-Key`` on ``POST /v1/messages``: a repeat of the same request with
the same key (per credential, within 24 h) answers the first answer's id and sends
nothing; the same key with a different request answers 409. The id is derived from
(credential, key, request hash), so two identical requests racing on two replicas
still produce one id, and the stages downstream are idempotent per id; the
(credential, key) -> (request hash, id, time) map lives on the compacted
``idempotency`` topic, read back by every replica and across restarts.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import signal
import time
import weakref
from datetime import UTC, datetime
from email import message_from_bytes
from importlib import resources
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    ContentEncodingError,
    HttpProcessingError,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_request import BaseRequest
from yarl import URL

from mailflow import metrics
from mailflow.api.auth import Authenticator, Principal, SyncReader, header_from_addresses
from mailflow.api.citizen import register as register_citizen_routes
from mailflow.api.compose import Composed, InputError, compose_json, prepare_raw
from mailflow.api.domains import dkim_refusal
from mailflow.api.domains import register as register_domains
from mailflow.api.inflow import InFlow
from mailflow.api.sanitize import sanitize_html
from mailflow.config import Settings
from mailflow.heap import freeze_startup
from mailflow.ids import encode as encode_id
from mailflow.ids import is_id, new_id
from mailflow.kafka_io import AsyncProducer, BrokerUnavailable
from mailflow.objstore import body_key, delete_body, get_body, put_body
from mailflow.rules import mime
from mailflow.rules.mailrules import AddressError, check_message, mailbox_key, parse_headers
from mailflow.rules.unsubscribe import links_for
from schemas.mail import Submission
from streams.topics import full_name

log = logging.getLogger("mailflow.api")

REGISTRY_KEEP_SECONDS = 300.0
IDEMPOTENCY_WINDOW = 24 * 3600.0
_IDEM_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
WEB_FILES = {"app.js": "text/javascript", "app.css": "text/css"}
# The webmail page: scripts only from here, nothing remote (srcdoc frames inherit it).
WEB_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
           "img-src 'self' data: blob:; connect-src 'self'; frame-src 'self' blob: data:; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def error(status: int, code: str, message: str, fields: dict[str, str] | None = None,
          headers: dict[str, str] | None = None) -> web.Response:
    err: dict[str, Any] = {"code": code, "message": message}
    if fields:
        err["fields"] = fields
    return web.json_response({"error": err}, status=status, headers=headers,
                             dumps=lambda o: orjson.dumps(o).decode())


def broker_unavailable(why: str) -> web.Response:
    """503: nothing was accepted; a client may send the same request again."""
    return error(503, "broker_unavailable", f"{why}; nothing was accepted", headers={"Retry-After": "5"})


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, headers=headers,
                        content_type="application/json")


def unauthorized(why: str) -> web.Response:
    challenge = 'Bearer realm="mailflow"'
    if why != "missing":
        challenge += ', error="invalid_token"'
    return error(401, "unauthorized", why, headers={"WWW-Authenticate": challenge})


def forbidden(message: str, fields: dict[str, str] | None = None) -> web.Response:
    return error(403, "forbidden", message, fields)


def derive_id(*parts: str) -> str:
    """A message id (26 characters of the id alphabet) that is a function of `parts`."""
    value = int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:17], "big")
    # Least significant digit first, as ids derived before an upgrade were written.
    return encode_id(value)[::-1]


def relay(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    """A stage's JSON answer passed on; an error's `fields` given the contract's shape
    (an object of field -> message) when a stage sent a list of names."""
    if status >= 400:
        try:
            doc = orjson.loads(body)
            fields = doc["error"].get("fields")
            if isinstance(fields, list):
                doc["error"]["fields"] = {str(f): doc["error"].get("message", "invalid") for f in fields}
                body = orjson.dumps(doc)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            text = body[:200].decode("utf-8", "replace")
            body = orjson.dumps({"error": {"code": "not_found" if status == 404 else "stage_error",
                                           "message": text or f"HTTP {status}"}})
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def worker_path(*segments: str) -> str:
    """A path toward a stage worker, every segment percent-encoded whole.

    Callers pass only validated parts (an id, a normalised address); encoding each
    one with nothing kept safe means no part can add, remove or climb a segment,
    whatever it contains, so no worker page but the one named is reachable.
    """
    return "".join("/" + quote(seg, safe="") for seg in segments)


ID_RULE = "26 characters of 0-9 and a-z without i, l, o, u (lower case)"
_ATTACHMENT_NO = re.compile(r"^[0-9]{1,6}$")


def _bad_id(text: str) -> web.Response | None:
    if is_id(text):
        return None
    return error(400, "invalid_input", "not a message id", {"id": ID_RULE})



class Ingress:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.submissions = full_name(settings, "submissions")
        self.idem_topic = full_name(settings, "idempotency")
        self.producer: AsyncProducer | None = None
        self.reader: SyncReader | None = None
        self.auth: Authenticator | None = None
        self.http: aiohttp.ClientSession | None = None
        self._idem_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self.inflow = InFlow(settings)

    # ---- lifecycle -------------------------------------------------------
    async def on_startup(self, _app: web.Application) -> None:
        s = self.settings
        # 30 s for a new partition leader: a broker failover delays a submission
        # instead of refusing it; with no broker at all, 503 within a second.
        self.producer = AsyncProducer(s.kafka_bootstrap, timeout_ms=30000, purge_when_down=True)
        self.reader = SyncReader(s.kafka_bootstrap,
                                 [full_name(s, "throttle"), full_name(s, "registry"),
                                  full_name(s, "auth"), self.idem_topic])
        self.auth = Authenticator(s, self.reader)
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15, sock_connect=2))
        self.inflow.start()

    async def on_cleanup(self, _app: web.Application) -> None:
        await self.inflow.stop()
        if self.http:
            await self.http.close()
        if self.producer:
            await asyncio.get_running_loop().run_in_executor(None, self.producer.close)
        if self.reader:
            self.reader.close()

    # ---- authentication ---------------------------------------------------
    async def principal(self, request: web.Request) -> Principal | web.Response:
        """Who is asking, or the 401 to answer."""
        assert self.auth is not None
        header = request.headers.get("Authorization")
        if self.auth.mode != "off" and not header:
            return unauthorized("missing")
        who, why = self.auth.verify(header, wait=False)
        if who is None and why.endswith("?"):  # unknown id: created a moment ago?
            who, why = await asyncio.get_running_loop().run_in_executor(None, self.auth.verify, header)
        if who is None:
            return unauthorized(why)
        return who

    def _sender_problem(self, who: Principal, c: Composed) -> web.Response | None:
        """403 unless `who` may send as the envelope sender and every From/Sender."""
        if not who.may_send_as(c.sender):
            return forbidden(f"this credential may not send as {c.sender}",
                             {"from": "not an address this credential may send as"})
        if c.extra.get("raw"):
            addrs = header_from_addresses(c.headers if c.headers is not None else parse_headers(c.raw))
            if not addrs and not who.admin:
                return forbidden("the message has no From header", {"from": "From header missing"})
            bad = [a for a in addrs if not who.may_send_as(a)]
            if bad:
                return forbidden(f"the From/Sender header names {bad[0]}, which this credential may not send as",
                                 {"from": "From header not allowed for this credential"})
        elif c.header_from and not who.may_send_as(c.header_from):
            return forbidden(f"this credential may not send as {c.header_from}", {"from": "not allowed"})
        return None

    async def whoami(self, request: web.Request) -> web.Response:
        """The credential's kind, id and what it may do (never the secret)."""
        who = await self.principal(request)
        if isinstance(who, web.Response):
            return who
        doc: dict[str, Any] = {"id": who.id, "kind": who.kind, "admin": who.admin, "name": who.name}
        if who.kind == "token":
            doc["address"] = who.address
        else:
            doc["domains"] = list(who.domains)
        return json_response(doc, headers={"Cache-Control": "no-store"})

    # ---- submission ------------------------------------------------------
    def throttled_for(self, sender: str) -> float:
        """Seconds the rate limiter still holds `sender` back (0 if not)."""
        assert self.reader is not None
        entry = self.reader.values[full_name(self.settings, "throttle")].get(sender)
        if not entry:
            return 0.0
        return max(0.0, float(entry.get("until", 0)) - time.time())

    async def submit(self, request: web.Request) -> web.Response:
        who = await self.principal(request)
        if isinstance(who, web.Response):
            return who
        length = request.content_length
        limit = self._body_limit(request)
        if length is not None and length > limit:
            return error(413, "too_large", f"request body is {length} bytes; the limit is {limit}")
        if request.content_type not in ("application/json", "message/rfc822"):
            return error(415, "unsupported_media_type", "send application/json or message/rfc822")
        try:
            async with asyncio.timeout(self.settings.api_body_timeout):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(413, "too_large", f"the message exceeds {self.settings.max_message_bytes} bytes")
        except RequestPayloadError as exc:  # a corrupt gzip/deflate body, a bad chunk
            log.debug("unreadable body: %r", exc)
            encoding = request.headers.get("Content-Encoding", "identity")
            return error(400, "bad_body", f"the request body could not be decoded (Content-Encoding: "
                         f"{encoding[:20]}, or its chunked framing)")
        except TimeoutError:
            return error(408, "body_timeout", f"the body did not arrive within {self.settings.api_body_timeout:g} s",
                         headers={"Connection": "close"})
        idem = request.headers.get("Idempotency-Key")
        if idem is None:
            return await self._submit(request, who, body, new_id())
        if not _IDEM_KEY.match(idem):
            return error(400, "invalid_input", "Idempotency-Key must be 1-255 visible ASCII characters",
                         {"Idempotency-Key": "1-255 visible ASCII characters"})
        return await self._submit_once(request, who, body, idem)

    async def _submit_once(self, request: web.Request, who: Principal, body: bytes,
                           idem: str) -> web.Response:
        """At most one message per (credential, Idempotency-Key) and request, 24 h."""
        assert self.reader is not None and self.producer is not None
        req_hash = hashlib.sha256(b"\x00".join([request.content_type.encode(),
                                                 request.query_string.encode(), body])).hexdigest()
        rkey = f"{who.id}:{hashlib.sha256(idem.encode()).hexdigest()[:32]}"
        # The key's record must be read before it can be called new, and with the
        # broker away it cannot be: answer at once rather than wait out a timeout.
        rkey_bytes = rkey.encode()
        partition = self.reader.partition_for(self.idem_topic, rkey_bytes)
        if self.producer.broker_down or partition is None:
            return broker_unavailable("Kafka is not reachable")
        lock = self._idem_locks.get(rkey)
        if lock is None:
            lock = self._idem_locks[rkey] = asyncio.Lock()
        async with lock:
            table = self.reader.values[self.idem_topic]
            # Another replica may have it: read its partition up to now. Unread, a
            # retry could be taken for a new request: refuse instead.
            if rkey not in table and not await self.reader.caught_up(self.idem_topic, partition):
                return broker_unavailable("could not read the idempotency records from Kafka")
            rec = table.get(rkey)
            salt = ""
            if rec and time.time() - float(rec.get("ts", 0)) < IDEMPOTENCY_WINDOW:
                if rec.get("hash") != req_hash:
                    return error(409, "idempotency_conflict",
                                 "this Idempotency-Key was used for a different request in the last 24 h")
                url = f"/v1/messages/{rec['id']}"
                return json_response({"id": rec["id"], "status_url": url}, 202,
                                     {"Location": url, "Idempotent-Replayed": "true"})
            if rec:
                salt = str(rec.get("id", ""))  # expired: a new id, not a duplicate of the old one
            msg_id = derive_id(rkey, req_hash, salt)
            resp = await self._submit(request, who, body, msg_id)
            if resp.status == 202:
                entry = {"hash": req_hash, "id": msg_id, "ts": time.time()}
                table[rkey] = entry
                try:  # after the ack: a crash before this write re-derives the same id
                    await self.producer.produce(self.idem_topic, rkey_bytes, orjson.dumps(entry),
                                                partition=partition)
                except BrokerUnavailable:
                    log.warning("idempotency record not written; a retry re-derives the same id")
            return resp

    async def _submit(self, request: web.Request, who: Principal, body: bytes,
                      msg_id: str) -> web.Response:
        s = self.settings
        now = datetime.now(UTC)
        message_id = f"<{msg_id}@{s.ehlo_name}>"
        try:
            if request.content_type == "application/json":
                try:
                    doc = orjson.loads(body)
                except orjson.JSONDecodeError as exc:
                    return error(400, "bad_json", f"the body is not valid UTF-8 JSON: {exc}")
                composed = compose_json(doc, message_id=message_id, date=now,
                                        max_recipients=s.max_recipients)
            else:
                q = request.query
                env_to = [t for t in q.get("to", "").split(",") if t.strip()] if "to" in q else None
                composed = prepare_raw(body, message_id=message_id, date=now,
                                       env_from=q.get("from"), env_to=env_to,
                                       max_recipients=s.max_recipients)
                composed.extra["raw"] = True
        except InputError as exc:
            return error(400, exc.code, str(exc), exc.fields)
        problem = self._sender_problem(who, composed)
        if problem is not None:
            return problem
        refusal = dkim_refusal(request.app, composed.raw, composed.recipients)  # MAILFLOW_DKIM=required
        if refusal is not None:
            return refusal
        return await self._accept(msg_id, composed)

    def _body_limit(self, request: web.Request) -> int:
        # JSON carries attachments in base64: allow for its 4/3 growth.
        m = self.settings.max_message_bytes
        return m * 4 // 3 + 65536 if request.content_type == "application/json" else m + 65536

    async def _accept(self, msg_id: str, c: Composed) -> web.Response:
        s = self.settings
        if len(c.raw) > s.max_message_bytes:
            return error(413, "too_large", f"the message is {len(c.raw)} bytes; the limit is {s.max_message_bytes}")
        problems = check_message(c.sender, c.recipients, c.raw, max_bytes=s.max_message_bytes,
                                 max_recipients=s.max_recipients)
        if problems:
            return error(400, problems[0].code, "; ".join(p.message for p in problems),
                         {p.field or "message": p.message for p in problems})
        wait = self.throttled_for(c.sender)
        if wait > 0:
            return error(429, "rate_limited", f"{c.sender} is over its sending rate; retry later",
                         headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        # Checked and within its sender's rate: now wait, briefly, if the pipeline
        # is behind (in-flow control; never a refusal).
        await self.inflow.admit()
        rec = Submission(id=msg_id, sender=c.sender, recipients=c.recipients,
                         received_at=time.time(), size=len(c.raw),
                         # RFC 8058 links per recipient (mailflow/rules/unsubscribe.py)
                         unsubscribe=(links_for(s, c.sender, c.recipients)
                                      if c.extra.get("unsubscribe") else None))
        ref = None
        if len(c.raw) > s.inline_max_bytes:
            ref = body_key(msg_id)
            try:
                await put_body(s.object_store_url, ref, c.raw)
            except Exception as exc:
                log.error("object store write failed: %r", exc)
                return error(503, "store_unavailable", "the object store is not available; nothing was accepted")
            rec.body_ref = ref
        else:
            rec.body = c.raw
        assert self.producer is not None
        try:
            await self.producer.send(self.submissions, c.sender.encode(), rec.to_json())
        except BrokerUnavailable as exc:
            if ref:
                try:
                    await delete_body(s.object_store_url, ref)
                except Exception:  # an orphan body is harmless; a lost message is not
                    log.warning("could not delete orphan body %s", ref)
            return broker_unavailable(f"Kafka is not available ({exc})")
        metrics.API_ACCEPTED.inc()
        url = f"/v1/messages/{msg_id}"
        return json_response({"id": msg_id, "status_url": url}, 202, {"Location": url})

    # ---- reads, routed to the owning stage -------------------------------
    def stage_urls(self, stage: str) -> list[str]:
        """The web addresses of `stage`'s replicas heard from within
        REGISTRY_KEEP_SECONDS, the latest heard from first. Older ones are kept after
        them: a replica started in place of a killed one answers at the same address,
        and a dead one refuses the connection at once."""
        assert self.reader is not None
        now = time.time()
        entries = [v for v in self.reader.values[full_name(self.settings, "registry")].values()
                   if v.get("stage") == stage and now - float(v.get("ts", 0)) < REGISTRY_KEEP_SECONDS]
        entries.sort(key=lambda v: -float(v.get("ts", 0)))
        return [v["url"] for v in entries]

    async def routed(self, stage: str, path: str, query: dict[str, str]) -> tuple[int, Any]:
        """GET `path` (made by `worker_path`, already encoded) from a live `stage` worker."""
        assert self.http is not None
        failed = []
        for url in self.stage_urls(stage):
            try:
                # encoded=True: sent exactly as built, never re-quoted or dot-normalised.
                async with self.http.get(URL(url.rstrip("/") + path, encoded=True), params=query) as resp:
                    return resp.status, await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                failed.append(f"{url}: {exc!r}")
        log.warning("no %s worker answered (%s)", stage, "; ".join(failed) or "none registered")
        raise web.HTTPServiceUnavailable(
            body=orjson.dumps({"error": {"code": "stage_unavailable",
                                         "message": f"no live {stage} worker to answer"}}),
            content_type="application/json")

    async def get_status(self, request: web.Request) -> web.Response:
        who = await self.principal(request)
        if isinstance(who, web.Response):
            return who
        msg_id = request.match_info["id"]
        if bad := _bad_id(msg_id):
            return bad
        status, body = await self.routed("status", worker_path("v1", "messages", msg_id), {})
        if status == 200 and not who.admin:
            try:
                sender = orjson.loads(body).get("sender")
            except (orjson.JSONDecodeError, AttributeError):
                sender = None
            if not who.may_read_status(sender):
                return forbidden("this message was not sent with this credential's addresses")
        return relay(status, body)

    async def mailbox_access(self, request: web.Request, with_id: bool = True) -> str | web.Response:
        """The store worker's path for the mailbox (and message) asked for, or the
        401/400/403 to answer.

        The address and id are validated before anything else is done with them
        (an id is an id, an address is an address in normal form) and the path is
        built from them alone, never from the request's own path.
        """
        who = await self.principal(request)
        if isinstance(who, web.Response):
            return who
        try:
            address = mailbox_key(request.match_info["address"])
        except AddressError as exc:
            return error(400, "invalid_input", "not a mailbox address", {"address": str(exc)})
        segments = ["v1", "mailboxes", address, "messages"]
        if with_id:
            msg_id = request.match_info["id"]
            if bad := _bad_id(msg_id):
                return bad
            segments.append(msg_id)
        if not who.may_read_mailbox(address):
            return forbidden("this credential may not read that mailbox")
        return worker_path(*segments)

    async def list_mailbox(self, request: web.Request) -> web.Response:
        path = await self.mailbox_access(request, with_id=False)
        if isinstance(path, web.Response):
            return path
        query = {k: v for k, v in request.query.items() if k in ("folder", "limit", "cursor")}
        status, body = await self.routed("store", path, query)
        return relay(status, body, {"Cache-Control": "no-store"})

    async def get_mailbox_message(self, request: web.Request) -> web.Response:
        path = await self.mailbox_access(request)
        if isinstance(path, web.Response):
            return path
        status, body = await self.routed("store", path, {})
        if status != 200:
            return relay(status, body)
        doc = orjson.loads(body)
        doc.pop("body_ref", None)
        if isinstance(doc.get("html"), str):
            doc["html_safe"], doc["remote_blocked"] = sanitize_html(doc["html"])
        return json_response(doc, headers={"Cache-Control": "no-store"})

    async def _raw(self, request: web.Request) -> bytes | web.Response:
        path = await self.mailbox_access(request)
        if isinstance(path, web.Response):
            return path
        status, body = await self.routed("store", path, {"parts": "0"})
        if status != 200:
            return relay(status, body)
        return await get_body(self.settings.object_store_url, orjson.loads(body)["body_ref"])

    async def get_mailbox_raw(self, request: web.Request) -> web.Response:
        raw = await self._raw(request)
        if isinstance(raw, web.Response):
            return raw
        return web.Response(body=raw, content_type="message/rfc822",
                            headers={"Cache-Control": "no-store"})

    async def get_attachment(self, request: web.Request) -> web.Response:
        """The n-th attachment (0-based, the order of the message's `attachments`),
        always as a download: never rendered in the webmail's origin."""
        if not _ATTACHMENT_NO.match(request.match_info["n"]):
            return error(400, "invalid_input", "the attachment number must be an integer", {"n": "integer"})
        n = int(request.match_info["n"])
        raw = await self._raw(request)
        if isinstance(raw, web.Response):
            return raw
        msg = message_from_bytes(raw, policy=mime.DEFAULT)
        found = [p for p in msg.walk() if not p.is_multipart()
                 and (p.get_filename() or p.get_content_disposition() == "attachment")]
        if not 0 <= n < len(found):
            return error(404, "not_found", f"the message has {len(found)} attachment(s)")
        part = found[n]
        name = part.get_filename() or f"attachment-{n}"
        return web.Response(body=part.get_payload(decode=True) or b"", headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name, safe='')}",
            "X-Attachment-Content-Type": part.get_content_type(),
            "Content-Security-Policy": "sandbox", "Cache-Control": "no-store"})

    # ---- operations -------------------------------------------------------
    async def get_queue(self, request: web.Request) -> web.Response:
        """`GET /v1/queue` (admin keys): what `mailflow queue show --json` prints."""
        who = await self.principal(request)
        if isinstance(who, web.Response):
            return who
        if not who.admin:
            return forbidden("the queue is shown to admin keys only")
        from mailflow.ops import queue

        try:
            doc = await asyncio.get_running_loop().run_in_executor(None, queue.snapshot, self.settings)
        except Exception as exc:  # KafkaException and kin: the broker did not answer
            log.warning("queue snapshot failed: %r", exc)
            return error(503, "broker_unavailable", "the queue could not be read from Kafka",
                         headers={"Retry-After": "5"})
        return json_response(doc)

    async def healthz(self, _request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        assert self.producer is not None
        ok = await asyncio.get_running_loop().run_in_executor(None, self.producer.probe)
        if not ok:
            return error(503, "broker_unavailable", "Kafka is not reachable")
        return json_response({"status": "ready"})

    async def metrics_page(self, _request: web.Request) -> web.Response:
        body, ctype = metrics.render()
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def openapi(self, _request: web.Request) -> web.Response:
        from schemas.api import openapi_document

        return json_response(openapi_document())

    async def webmail(self, _request: web.Request) -> web.Response:
        page = resources.files("mailflow").joinpath("web/index.html").read_bytes()
        return web.Response(body=page, content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": WEB_CSP,
                                     "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"})

    async def web_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in WEB_FILES:
            return error(404, "not_found", "no such file")
        data = resources.files("mailflow").joinpath(f"web/{name}").read_bytes()
        return web.Response(body=data, content_type=WEB_FILES[name], charset="utf-8")


@web.middleware
async def errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "?"
    try:
        resp = await handler(request)
    except web.HTTPRequestEntityTooLarge as exc:
        resp = error(413, "too_large", f"request body too large: {exc.text}")
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        resp = error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason,
                     headers={"Allow": ", ".join(sorted(exc.allowed_methods))}
                     if isinstance(exc, web.HTTPMethodNotAllowed) else None)
    except ConnectionError:
        # The client went away (mid-body, say): nobody to answer, nothing wrong here.
        log.debug("client disconnected during %s %s", request.method, request.path)
        raise
    except Exception:
        log.exception("internal error on %s", request.path)
        resp = error(500, "internal", "internal error")
    metrics.API_REQUESTS.labels(route, str(resp.status)).inc()
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    return resp


def make_app(settings: Settings) -> web.Application:
    ing = Ingress(settings)
    app = web.Application(middlewares=[errors_as_json],
                          client_max_size=settings.max_message_bytes * 4 // 3 + 65536)
    app.on_startup.append(ing.on_startup)
    app.on_cleanup.append(ing.on_cleanup)
    app.router.add_post("/v1/messages", ing.submit)
    app.router.add_get("/v1/messages/{id}", ing.get_status)
    app.router.add_get("/v1/whoami", ing.whoami)
    app.router.add_get("/v1/queue", ing.get_queue)
    app.router.add_get("/v1/mailboxes/{address}/messages", ing.list_mailbox)
    app.router.add_get("/v1/mailboxes/{address}/messages/{id}", ing.get_mailbox_message)
    app.router.add_get("/v1/mailboxes/{address}/messages/{id}/raw", ing.get_mailbox_raw)
    app.router.add_get("/v1/mailboxes/{address}/messages/{id}/attachments/{n}", ing.get_attachment)
    app.router.add_get("/healthz", ing.healthz)
    app.router.add_get("/readyz", ing.readyz)
    app.router.add_get("/metrics", ing.metrics_page)
    app.router.add_get("/openapi.json", ing.openapi)
    app.router.add_get("/", ing.webmail)
    app.router.add_get("/{name:app\\.(?:js|css)}", ing.web_file)
    app["ingress"] = ing
    register_domains(app, ing, settings)
    register_citizen_routes(app, ing)  # suppressions, unsubscribe, webhooks
    return app


class JsonErrorHandler(RequestHandler):
    """aiohttp's per-connection handler, answering the errors it makes itself in the
    API's JSON error shape.

    The HTTP parser's 400s (a URL or header line over 8 KB, bad chunk sizes, a
    duplicate Content-Length, an unsupported Content-Encoding) never reach a
    middleware: aiohttp answers them here, by default in plain text that echoes the
    offending request bytes. Client errors are logged at debug level: anyone can
    send them, and they must not flood the log.
    """

    def data_received(self, data: bytes) -> None:
        # aiohttp's C parser, failing on a body it is already streaming to a handler
        # (a bad chunk size arriving after the headers did), drops that body's reader
        # without ending it: the handler waited out its body timeout, and the 400
        # queued behind it waited with it (a CI test's raw request timed out). The
        # reader is failed instead, and the handler answers 400 at once.
        # aiohttp's own attributes, read with defaults: on a version without them this
        # does nothing (tests/api/test_security.py's bad-chunk test then fails).
        request = getattr(self, "_current_request", None)
        messages = getattr(self, "_messages", None)
        queued = len(messages) if messages is not None else 0
        super().data_received(data)
        if request is None or messages is None or len(messages) <= queued:
            return
        info = messages[-1][0]
        body = request.content
        if isinstance(info, _ErrInfo) and not body.is_eof() and body.exception() is None:
            body.set_exception(RequestPayloadError(_parser_problem(info.exc)))

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # After an early answer aiohttp drains ("lingers on") the rest of the body,
        # and a body that is corrupt, or a client that left, fails there: the
        # client's doing, already answered, so a debug line rather than an ERROR.
        exc = kw.get("exc_info")
        if isinstance(exc, RequestPayloadError | ConnectionError):
            log.debug("after the answer: %r", exc)
            return
        super().log_exception(*args, **kw)

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500 and not isinstance(exc, ConnectionError):
            self.log_exception("Error handling request", exc_info=exc)
        else:
            log.debug("HTTP %s for %s: %r", status, request.remote, exc)
        if request.writer.output_size > 0:  # as aiohttp's own: too late for an answer
            raise ConnectionError("a response is sent already; cannot send the error")
        if status >= 500:
            resp = error(status, "internal", "internal error")
        else:
            resp = error(status, "bad_request", f"the request is not acceptable HTTP/1.1: {_parser_problem(exc)}")
        resp.force_close()
        if not isinstance(exc, ConnectionError):  # a client that left is no error of ours
            metrics.API_REQUESTS.labels("?", str(status)).inc()
        return resp


def _parser_problem(exc: BaseException | None) -> str:
    """What aiohttp's parser refused, in words that never repeat the request."""
    if isinstance(exc, LineTooLong):
        return "the request line or a header line is too long (8190 bytes at most)"
    if isinstance(exc, ContentEncodingError):
        return "unsupported Content-Encoding (gzip and deflate are accepted)"
    if isinstance(exc, InvalidURLError):
        return "the request target is not a valid URL"
    if isinstance(exc, BadHttpMethod):
        return "not an HTTP method"
    if isinstance(exc, HttpProcessingError):
        # The parser's own message, up to where it starts quoting the input.
        return exc.message.split(":", 1)[0].strip() or "malformed request"
    return "malformed request"


class JsonErrorServer(web.Server):
    """`web.Server` making `JsonErrorHandler` connections."""

    def __call__(self) -> RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """`web.AppRunner` serving the app through `JsonErrorServer`."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return JsonErrorServer(plain.request_handler, request_factory=plain.request_factory,
                               handler_cancellation=plain.handler_cancellation, loop=plain._loop,
                               **plain._kwargs)


async def serve(settings: Settings, host: str, port: int, reuse_port: bool = False) -> None:
    """Serve the API on host:port until SIGINT or SIGTERM.

    `keepalive_timeout` is also the header timeout: aiohttp closes a connection
    that has not sent a whole request's headers that long after it opened or after
    its last answer (a slow-headers client is closed, not kept forever).
    """
    runner = JsonErrorRunner(make_app(settings), access_log=None,
                             keepalive_timeout=settings.api_header_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
        freeze_startup()
        print(f"mailflow api: serving on http://{host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(settings: Settings, host: str | None = None, port: int | None = None,
        reuse_port: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(settings, host or settings.api_host, port or settings.api_port, reuse_port))
    return 0
