"""The HTTP ingress (aiohttp): `mailflow api`.

``POST /v1/messages`` answers 202 only once Kafka acknowledged the submission
(acks=all, idempotent producer); bad input gets a 4xx naming each bad field and
nothing enters Kafka; a broker that is down gets 503 and nothing half-accepted
(a claim-checked body written before the failed send is deleted again).

Reads are routed to the stage that owns the data: status to the ``status`` stage,
mailboxes to the ``store`` stage, found through the compacted ``registry`` topic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from mailflow import metrics
from mailflow.api.compose import Composed, InputError, compose_json, prepare_raw
from mailflow.config import Settings
from mailflow.ids import new_id
from mailflow.kafka_io import AsyncProducer, BrokerUnavailable, CompactedReader
from mailflow.mailrules import check_message
from mailflow.objstore import body_key, delete_body, get_body, put_body
from schemas.records import Message
from streams.topics import full_name

log = logging.getLogger("mailflow.api")

REGISTRY_FRESH_SECONDS = 20.0


def error(status: int, code: str, message: str, fields: dict[str, str] | None = None,
          headers: dict[str, str] | None = None) -> web.Response:
    err: dict[str, Any] = {"code": code, "message": message}
    if fields:
        err["fields"] = fields
    return web.json_response({"error": err}, status=status, headers=headers,
                             dumps=lambda o: orjson.dumps(o).decode())


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, headers=headers,
                        content_type="application/json")


class Ingress:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.submissions = full_name(settings, "submissions")
        self.producer: AsyncProducer | None = None
        self.reader: CompactedReader | None = None
        self.http: aiohttp.ClientSession | None = None

    # ---- lifecycle -------------------------------------------------------
    async def on_startup(self, _app: web.Application) -> None:
        s = self.settings
        self.producer = AsyncProducer(s.kafka_bootstrap)
        self.reader = CompactedReader(s.kafka_bootstrap,
                                      [full_name(s, "throttle"), full_name(s, "registry")])
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))

    async def on_cleanup(self, _app: web.Application) -> None:
        if self.http:
            await self.http.close()
        if self.producer:
            await asyncio.get_running_loop().run_in_executor(None, self.producer.close)
        if self.reader:
            self.reader.close()

    # ---- submission ------------------------------------------------------
    def throttled_for(self, sender: str) -> float:
        """Seconds the rate limiter still holds `sender` back (0 if not)."""
        assert self.reader is not None
        entry = self.reader.values[full_name(self.settings, "throttle")].get(sender)
        if not entry:
            return 0.0
        return max(0.0, float(entry.get("until", 0)) - time.time())

    async def submit(self, request: web.Request) -> web.Response:
        s = self.settings
        length = request.content_length
        limit = self._body_limit(request)
        if length is not None and length > limit:
            return error(413, "too_large", f"request body is {length} bytes; the limit is {limit}")
        msg_id = new_id()
        now = datetime.now(UTC)
        message_id = f"<{msg_id}@{s.ehlo_name}>"
        ctype = request.content_type
        try:
            if ctype == "application/json":
                try:
                    doc = orjson.loads(await request.read())
                except orjson.JSONDecodeError as exc:
                    return error(400, "bad_json", f"the body is not valid UTF-8 JSON: {exc}")
                composed = compose_json(doc, message_id=message_id, date=now,
                                        max_recipients=s.max_recipients)
            elif ctype == "message/rfc822":
                q = request.query
                env_to = [t for t in q.get("to", "").split(",") if t.strip()] if "to" in q else None
                composed = prepare_raw(await request.read(), message_id=message_id, date=now,
                                       env_from=q.get("from"), env_to=env_to,
                                       max_recipients=s.max_recipients)
            else:
                return error(415, "unsupported_media_type",
                             "send application/json or message/rfc822")
        except web.HTTPRequestEntityTooLarge:
            return error(413, "too_large", f"the message exceeds {s.max_message_bytes} bytes")
        except InputError as exc:
            return error(400, exc.code, str(exc), exc.fields)
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
        rec = Message(id=msg_id, sender=c.sender, recipients=c.recipients,
                      received_at=time.time(), size=len(c.raw))
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
            return error(503, "broker_unavailable", f"Kafka is not available ({exc}); nothing was accepted",
                         headers={"Retry-After": "5"})
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
                async with self.http.get(url + path, params=query) as resp:
                    return resp.status, await resp.read()
            except (aiohttp.ClientError, TimeoutError):
                continue
        raise web.HTTPServiceUnavailable(
            body=orjson.dumps({"error": {"code": "stage_unavailable",
                                         "message": f"no live {stage} worker to answer"}}),
            content_type="application/json")

    async def get_status(self, request: web.Request) -> web.Response:
        status, body = await self.routed("status", f"/v1/messages/{request.match_info['id']}", {})
        return web.Response(body=body, status=status, content_type="application/json")

    async def list_mailbox(self, request: web.Request) -> web.Response:
        address = request.match_info["address"]
        status, body = await self.routed("store", f"/v1/mailboxes/{address}/messages",
                                         dict(request.query))
        return web.Response(body=body, status=status, content_type="application/json")

    async def get_mailbox_message(self, request: web.Request) -> web.Response:
        address, msg_id = request.match_info["address"], request.match_info["id"]
        status, body = await self.routed("store", f"/v1/mailboxes/{address}/messages/{msg_id}", {})
        if status != 200:
            return web.Response(body=body, status=status, content_type="application/json")
        doc = orjson.loads(body)
        doc.pop("body_ref", None)
        return json_response(doc)

    async def get_mailbox_raw(self, request: web.Request) -> web.Response:
        address, msg_id = request.match_info["address"], request.match_info["id"]
        status, body = await self.routed("store", f"/v1/mailboxes/{address}/messages/{msg_id}",
                                         {"parts": "0"})
        if status != 200:
            return web.Response(body=body, status=status, content_type="application/json")
        raw = await get_body(self.settings.object_store_url, orjson.loads(body)["body_ref"])
        return web.Response(body=raw, content_type="message/rfc822")

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
        return web.Response(body=page, content_type="text/html")


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
    return resp


def make_app(settings: Settings) -> web.Application:
    ing = Ingress(settings)
    app = web.Application(middlewares=[errors_as_json],
                          client_max_size=settings.max_message_bytes * 4 // 3 + 65536)
    app.on_startup.append(ing.on_startup)
    app.on_cleanup.append(ing.on_cleanup)
    app.router.add_post("/v1/messages", ing.submit)
    app.router.add_get("/v1/messages/{id}", ing.get_status)
    app.router.add_get("/v1/mailboxes/{address}/messages", ing.list_mailbox)
    app.router.add_get("/v1/mailboxes/{address}/messages/{id}", ing.get_mailbox_message)
    app.router.add_get("/v1/mailboxes/{address}/messages/{id}/raw", ing.get_mailbox_raw)
    app.router.add_get("/healthz", ing.healthz)
    app.router.add_get("/readyz", ing.readyz)
    app.router.add_get("/metrics", ing.metrics_page)
    app.router.add_get("/openapi.json", ing.openapi)
    app.router.add_get("/", ing.webmail)
    app["ingress"] = ing
    return app


def run(settings: Settings, host: str | None = None, port: int | None = None,
        reuse_port: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    web.run_app(make_app(settings), host=host or settings.api_host, port=port or settings.api_port,
                access_log=None, reuse_port=reuse_port, print=lambda m: print(f"mailflow api: {m}", flush=True))
    return 0
