"""Admin API for sending domains: ``GET/POST /v1/domains``, ``GET /v1/domains/{domain}``.

Answers carry each domain's selectors (name, algorithm, public key, state, dates)
and the DNS records to publish (``dns``, as ``mailflow domains dns --json``);
private keys never (they stay sealed on the ``domains`` topic). Admin keys only
(domains ``*``): 401 without a credential, 403 for any other.

``POST /v1/domains`` ``{"domain": "example.com", "ed25519": false}`` makes the
keys: 201 with the domain; 400 for a bad name, 409 if it has keys already.

``dkim_refusal`` is the submission check for ``MAILFLOW_DKIM=required``: mail for
remote recipients from a From domain without a key gets 422 ``dkim_key_missing``
naming the domain, and nothing is accepted.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from mailflow.config import Settings
from mailflow.mta import domains as dom
from mailflow.mta.signing import from_domain
from streams.topics import full_name

KEY = web.AppKey("domains_api", object)


class DomainsApi:
    def __init__(self, ingress: Any, settings: Settings) -> None:
        self.ing, self.settings = ingress, settings
        self.topic = full_name(settings, dom.TOPIC)
        self.reader: Any = None
        self._adding = asyncio.Lock()  # one add at a time: the check and the write agree

    async def on_startup(self, _app: web.Application) -> None:
        self.reader = await asyncio.get_running_loop().run_in_executor(None, dom.follow, self.settings)

    async def on_cleanup(self, _app: web.Application) -> None:
        if self.reader is not None:
            self.reader.close()

    def record(self, domain: str) -> dict[str, Any] | None:
        return self.reader.values[self.topic].get(domain) if self.reader is not None else None

    async def _admin(self, request: web.Request) -> web.Response | None:
        from mailflow.api.server import forbidden

        who = await self.ing.principal(request)
        if isinstance(who, web.Response):
            return who
        if not who.admin:
            return forbidden("sending domains are for admin keys (domains *)")
        return None

    def _view(self, rec: dict[str, Any]) -> dict[str, Any]:
        return dom.public_view(rec, self.settings)

    async def list(self, request: web.Request) -> web.Response:
        from mailflow.api.server import json_response

        if (denied := await self._admin(request)) is not None:
            return denied
        recs = sorted(self.reader.values[self.topic].values(), key=lambda r: r["domain"])
        return json_response({"domains": [self._view(r) for r in recs]})

    async def get(self, request: web.Request) -> web.Response:
        from mailflow.api.server import error, json_response

        if (denied := await self._admin(request)) is not None:
            return denied
        try:
            name = dom.normalize_domain(request.match_info["domain"])
        except dom.DomainError as exc:
            return error(400, "invalid_input", str(exc), {"domain": str(exc)})
        rec = self.record(name)
        if rec is None:
            return error(404, "not_found", f"{name} is not a sending domain")
        return json_response(self._view(rec))

    async def add(self, request: web.Request) -> web.Response:
        from mailflow.api.server import error, json_response

        if (denied := await self._admin(request)) is not None:
            return denied
        try:
            doc = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return error(400, "bad_json", f"the body is not valid JSON: {exc}")
        if not isinstance(doc, dict) or not isinstance(doc.get("domain"), str):
            return error(400, "invalid_input", "send {\"domain\": \"example.com\"}", {"domain": "required"})
        ed = doc.get("ed25519", False)
        if not isinstance(ed, bool):
            return error(400, "invalid_input", "ed25519 must be true or false", {"ed25519": "not a boolean"})
        try:
            name = dom.normalize_domain(doc["domain"])
        except dom.DomainError as exc:
            return error(400, "invalid_input", str(exc), {"domain": str(exc)})
        from mailflow.mta.keyring import operator_key

        def make() -> dict[str, Any]:
            rec = dom.new_domain(operator_key(self.settings), name, ed)
            dom.write(self.settings, name, rec)
            return rec

        async with self._adding:
            if self.record(name) is not None:
                return error(409, "exists", f"{name} has DKIM keys already (rotate them with "
                             f"`mailflow domains rotate {name}`)")
            try:
                rec = await asyncio.get_running_loop().run_in_executor(None, make)
            except RuntimeError as exc:
                return error(503, "broker_unavailable", f"{exc}; nothing was made", headers={"Retry-After": "5"})
            # Written and acknowledged: known here at once, before the reader sees it come
            # back, so a second add right after is a 409 and never replaces the new keys.
            self.reader.values[self.topic][name] = rec
        return json_response(self._view(rec), 201)


def register(app: web.Application, ingress: Any, settings: Settings) -> None:
    api = DomainsApi(ingress, settings)
    app[KEY] = api
    app.on_startup.append(api.on_startup)
    app.on_cleanup.append(api.on_cleanup)
    app.router.add_get("/v1/domains", api.list)
    app.router.add_post("/v1/domains", api.add)
    app.router.add_get("/v1/domains/{domain}", api.get)


def dkim_refusal(app: web.Application, raw: bytes, recipients: list[str]) -> web.Response | None:
    """422 ``dkim_key_missing`` under ``MAILFLOW_DKIM=required`` for remote mail from a
    From domain without a key; None when the message may be accepted."""
    from mailflow.api.server import error

    api: DomainsApi = app[KEY]  # type: ignore[assignment]
    s = api.settings
    if s.dkim != "required" or all(s.is_local(r) for r in recipients):
        return None
    domain = from_domain(raw)
    if domain is not None and api.record(domain) is not None:
        return None
    what = domain or "(no From domain)"
    return error(422, "dkim_key_missing",
                 f"MAILFLOW_DKIM=required and the sending domain {what} has no DKIM key "
                 f"(add one: mailflow domains add {what}); nothing was accepted", {"from": what})
