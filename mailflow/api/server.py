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

from mailflow import metrics, mime
from mailflow.api.auth import Authenticator, Principal, SyncReader, header_from_addresses
from mailflow.api.citizen import register as register_citizen_routes
from mailflow.api.compose import Composed, InputError, compose_json, prepare_raw
from mailflow.api.inflow import InFlow
from mailflow.api.sanitize import sanitize_html
from mailflow.config import Settings
from mailflow.ids import encode as encode_id
from mailflow.ids import new_id
from mailflow.kafka_io import AsyncProducer, BrokerUnavailable
from mailflow.mailrules import AddressError, check_message, normalize_address, parse_headers
from mailflow.objstore import body_key, delete_body, get_body, put_body
from mailflow.unsubscribe import links_for
from schemas.records import Message
from streams.topics import full_name

log = logging.getLogger("mailflow.api")

REGISTRY_FRESH_SECONDS = 20.0
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


def _mailbox_address(text: str) -> str:
    try:
        return normalize_address(text)
    except AddressError:
        return text


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
        self.producer = AsyncProducer(s.kafka_bootstrap)
        self.reader = SyncReader(s.kafka_bootstrap,
                                 [full_name(s, "throttle"), full_name(s, "registry"),
                                  full_name(s, "auth"), self.idem_topic])
        self.auth = Authenticator(s, self.reader)
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
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
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(413, "too_large", f"the message exceeds {self.settings.max_message_bytes} bytes")
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
        rec = Message(id=msg_id, sender=c.sender, recipients=c.recipients,
                      received_at=time.time(), size=len(c.raw))
        if c.extra.get("unsubscribe"):  # RFC 8058 links per recipient (mailflow/unsubscribe.py)
            rec.meta["unsubscribe"] = links_for(s, c.sender, c.recipients)
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
        assert self.reader is not None
        now = time.time()
        entries = [v for v in self.reader.values[full_name(self.settings, "registry")].values()
                   if v.get("stage") == stage and now - float(v.get("ts", 0)) < REGISTRY_FRESH_SECONDS]
        entries.sort(key=lambda v: -float(v.get("ts", 0)))
        return [v["url"] for v in entries]

    async def routed(self, stage: str, path: str, query: dict[str, str]) -> tuple[int, Any]:
        assert self.http is not None
        for url in self.stage_urls(stage):
            try:
                async with self.http.get(url + quote(path, safe="/@"), params=query) as resp:
                    return resp.status, await resp.read()
            except (aiohttp.ClientError, TimeoutError):
                continue
        raise web.HTTPServiceUnavailable(
            body=orjson.dumps({"error": {"code": "stage_unavailable",
                                         "message": f"no live {stage} worker to answer"}}),
            content_type="application/json")

    async def get_status(self, request: web.Request) -> web.Response:
        who = await self.principal(request)
        if isinstance(who, web.Response):
            return who
        status, body = await self.routed("status", f"/v1/messages/{request.match_info['id']}", {})
        if status == 200 and not who.admin:
            try:
                sender = orjson.loads(body).get("sender")
            except (orjson.JSONDecodeError, AttributeError):
                sender = None
            if not who.may_read_status(sender):
                return forbidden("this message was not sent with this credential's addresses")
        return relay(status, body)

    async def mailbox_access(self, request: web.Request) -> str | web.Response:
        """The mailbox address to read, or the 401/403 to answer."""
        who = await self.principal(request)
        if isinstance(who, web.Response):
            return who
        address = request.match_info["address"]
        if who.admin:
            return address
        address = _mailbox_address(address)
        if not who.may_read_mailbox(address):
            return forbidden("this credential may not read that mailbox")
        return address

    async def list_mailbox(self, request: web.Request) -> web.Response:
        address = await self.mailbox_access(request)
        if isinstance(address, web.Response):
            return address
        status, body = await self.routed("store", f"/v1/mailboxes/{address}/messages",
                                         dict(request.query))
        return relay(status, body, {"Cache-Control": "no-store"})

    async def get_mailbox_message(self, request: web.Request) -> web.Response:
        address = await self.mailbox_access(request)
        if isinstance(address, web.Response):
            return address
        msg_id = request.match_info["id"]
        status, body = await self.routed("store", f"/v1/mailboxes/{address}/messages/{msg_id}", {})
        if status != 200:
            return relay(status, body)
        doc = orjson.loads(body)
        doc.pop("body_ref", None)
        if isinstance(doc.get("html"), str):
            doc["html_safe"], doc["remote_blocked"] = sanitize_html(doc["html"])
        return json_response(doc, headers={"Cache-Control": "no-store"})

    async def _raw(self, request: web.Request) -> bytes | web.Response:
        address = await self.mailbox_access(request)
        if isinstance(address, web.Response):
            return address
        msg_id = request.match_info["id"]
        status, body = await self.routed("store", f"/v1/mailboxes/{address}/messages/{msg_id}",
                                         {"parts": "0"})
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
        try:
            n = int(request.match_info["n"])
        except ValueError:
            return error(400, "invalid_input", "the attachment number must be an integer", {"n": "integer"})
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
        resp = error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
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
    register_citizen_routes(app, ing)  # suppressions, unsubscribe, webhooks (issue 16)
    return app


def run(settings: Settings, host: str | None = None, port: int | None = None,
        reuse_port: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    web.run_app(make_app(settings), host=host or settings.api_host, port=port or settings.api_port,
                access_log=None, reuse_port=reuse_port, print=lambda m: print(f"mailflow api: {m}", flush=True))
    return 0
