"""``/v1/webhooks``: register, list and delete webhook endpoints, per credential.

* ``POST /v1/webhooks`` ``{"url", "events": ["delivered", "bounced", ...] | ["*"]}``
  answers 201 ``{"id", "url", "events", "created_at", "secret"}``: the secret is
  shown this once (it is kept encrypted, see `mailflow.webhooks`). The URL must
  resolve to public addresses only, unless ``MAILFLOW_WEBHOOK_ALLOW_PRIVATE=true``.
* ``GET /v1/webhooks``: the credential's own webhooks, without secrets.
* ``DELETE /v1/webhooks/{id}``: one of the credential's own; 404 for anyone else's.

A webhook hears of the mail the credential may read the status of: an API key's
domains (an admin key: all), a mailbox token's own address.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import orjson
from aiohttp import web

from mailflow.kafka_io import BrokerUnavailable
from mailflow.webhooks import (
    EVENTS,
    TOPIC,
    allow_private,
    check_url,
    new_secret,
    resolve_allowed,
    seal,
)
from streams.topics import full_name

MAX_HOOKS = 20  # per credential


def _public(hook: dict[str, Any]) -> dict[str, Any]:
    return {k: hook[k] for k in ("id", "url", "events", "created_at") if k in hook}


class Webhooks:
    def __init__(self, ing: Any) -> None:
        self.ing = ing
        self.topic = full_name(ing.settings, TOPIC)
        self.reader: Any = None

    async def on_startup(self, _app: web.Application) -> None:
        from mailflow.api.auth import SyncReader

        self.reader = SyncReader(self.ing.settings.kafka_bootstrap, [self.topic])

    async def on_cleanup(self, _app: web.Application) -> None:
        if self.reader is not None:
            self.reader.close()

    def _err(self, status: int, code: str, message: str, fields: dict[str, str] | None = None) -> web.Response:
        from mailflow.api.server import error

        return error(status, code, message, fields)

    async def _own(self, owner: str) -> list[dict[str, Any]] | web.Response:
        from mailflow.api.server import broker_unavailable

        if not await self.reader.caught_up(self.topic, 0):
            return broker_unavailable("could not read the webhooks from Kafka")
        hooks = [h for h in self.reader.values[self.topic].values() if h and h.get("owner") == owner]
        return sorted(hooks, key=lambda h: h.get("created_at", 0))

    async def create(self, request: web.Request) -> web.Response:
        from mailflow.api.server import broker_unavailable, json_response

        who = await self.ing.principal(request)
        if isinstance(who, web.Response):
            return who
        try:
            doc = await request.json()
        except ValueError:
            return self._err(400, "bad_json", "the body is not valid JSON")
        if not isinstance(doc, dict):
            return self._err(400, "invalid_input", "the body must be a JSON object", {"body": "not an object"})
        fields = {k: "unknown field" for k in sorted(set(doc) - {"url", "events"})}
        where = check_url(doc.get("url"))
        if isinstance(where, str):
            fields["url"] = where
        events = doc.get("events")
        if (not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events)
                or not set(events) <= {*EVENTS, "*"}):
            fields["events"] = f"a non-empty list of states from {', '.join(EVENTS)}, or [\"*\"]"
        if not fields and isinstance(where, tuple):
            why = await asyncio.get_running_loop().run_in_executor(
                None, resolve_allowed, where[0], where[1], allow_private())
            if why:
                fields["url"] = why
        if fields:
            return self._err(400, "invalid_input", "; ".join(f"{k}: {v}" for k, v in fields.items()), fields)
        own = await self._own(who.id)
        if isinstance(own, web.Response):
            return own
        if len(own) >= MAX_HOOKS:
            return self._err(400, "too_many_webhooks", f"at most {MAX_HOOKS} webhooks per credential",
                             {"url": "delete one first"})
        hook_id = "wh_" + secrets.token_hex(8)
        secret = new_secret()
        hook = {"id": hook_id, "url": doc["url"], "events": sorted(set(events or ())), "owner": who.id,
                "scope": {"kind": who.kind, "domains": list(who.domains), "address": who.address},
                "created_at": time.time(), "secret": seal(self.ing.settings, hook_id, secret)}
        try:
            await self.ing.producer.send(self.topic, hook_id.encode(), orjson.dumps(hook))
        except BrokerUnavailable as exc:
            return broker_unavailable(f"Kafka is not available ({exc})")
        return json_response({**_public(hook), "secret": secret}, 201,
                             {"Location": f"/v1/webhooks/{hook_id}", "Cache-Control": "no-store"})

    async def list(self, request: web.Request) -> web.Response:
        from mailflow.api.server import json_response

        who = await self.ing.principal(request)
        if isinstance(who, web.Response):
            return who
        own = await self._own(who.id)
        if isinstance(own, web.Response):
            return own
        return json_response({"webhooks": [_public(h) for h in own]})

    async def delete(self, request: web.Request) -> web.Response:
        from mailflow.api.server import broker_unavailable, json_response

        who = await self.ing.principal(request)
        if isinstance(who, web.Response):
            return who
        own = await self._own(who.id)
        if isinstance(own, web.Response):
            return own
        hook_id = request.match_info["id"]
        hook = next((h for h in own if h.get("id") == hook_id), None)
        if hook is None:
            return self._err(404, "not_found", f"no webhook {hook_id} of this credential")
        try:
            await self.ing.producer.produce(self.topic, hook_id.encode(), None)
        except BrokerUnavailable as exc:
            return broker_unavailable(f"Kafka is not available ({exc})")
        return json_response({"deleted": _public(hook)})


def register(app: web.Application, ing: Any) -> None:
    w = Webhooks(ing)
    app.on_startup.append(w.on_startup)
    app.on_cleanup.append(w.on_cleanup)
    app.router.add_post("/v1/webhooks", w.create)
    app.router.add_get("/v1/webhooks", w.list)
    app.router.add_delete("/v1/webhooks/{id}", w.delete)
