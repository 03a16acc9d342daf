"""Sending like a good citizen, over HTTP: the suppression list, RFC 8058 one-click
unsubscribe and webhook endpoints.

* ``GET /v1/suppressions?domain=D`` lists the suppressed recipients of sender
  domain D; ``POST /v1/suppressions`` ``{"domain", "address", "note"?}`` adds one
  (reason ``api``); ``DELETE /v1/suppressions/{domain}/{address}`` removes one.
  Each needs an API key whose domains include D (an admin key: any); mailbox
  tokens get 403.
* ``POST /v1/unsubscribe/{token}`` with the body ``List-Unsubscribe=One-Click``
  (RFC 8058; form-encoded or plain) needs no credential, answers 200 and
  suppresses the token's recipient for its sender domain (reason ``unsubscribe``).
  ``GET`` on the same URL shows a page with a button that makes that POST; it
  never unsubscribes by itself (mail scanners follow links). A forged or altered
  token is answered 404 on both.
* ``/v1/webhooks``: see `mailflow.api.webhooks`.

The list itself is the compacted ``suppressions`` topic (`mailflow.suppression`).
"""

from __future__ import annotations

import html
from typing import Any

from aiohttp import web

from mailflow.api.auth import Principal, domain_allowed
from mailflow.kafka_io import BrokerUnavailable
from mailflow.rules.mailrules import AddressError, normalize_address
from mailflow.rules.unsubscribe import read_token, secret
from mailflow.suppression import SuppressionList, entry, produce

ONE_CLICK = "List-Unsubscribe=One-Click"
MAX_NOTE = 200


class Citizen:
    """The handlers; `ing` is the server's `Ingress` (authentication, producer, errors)."""

    def __init__(self, ing: Any) -> None:
        self.ing = ing
        self.list: SuppressionList | None = None
        self._key: bytes | None = None

    async def on_startup(self, _app: web.Application) -> None:
        self.list = SuppressionList(self.ing.settings)
        self._key = secret(self.ing.settings)

    async def on_cleanup(self, _app: web.Application) -> None:
        if self.list:
            self.list.close()

    # ---- helpers ---------------------------------------------------------
    @staticmethod
    def _err(status: int, code: str, message: str, fields: dict[str, str] | None = None) -> web.Response:
        from mailflow.api.server import error

        return error(status, code, message, fields)

    async def _who_for_domain(self, request: web.Request, domain: str) -> Principal | web.Response:
        who = await self.ing.principal(request)
        if isinstance(who, web.Response):
            return who
        if not domain or "@" in domain or any(c.isspace() for c in domain):
            return self._err(400, "invalid_input", "a sender domain is required", {"domain": "not a domain"})
        if who.kind == "token" or not (who.admin or domain_allowed(who.domains, f"x@{domain}")):
            return self._err(403, "forbidden", f"this credential may not manage the suppressions of {domain}",
                             {"domain": "not a domain of this credential"})
        return who

    async def _current(self) -> bool:
        """Whether the list has read everything written before now (else: 503)."""
        assert self.list is not None
        return await self.list.reader.caught_up(self.list.topic, 0)

    async def _write(self, rec: dict[str, Any] | None, domain: str = "", address: str = "") -> web.Response | None:
        assert self.list is not None and self.ing.producer is not None
        try:
            partition, offset = await produce(self.ing.producer, self.ing.settings, rec, domain, address)
        except BrokerUnavailable as exc:
            from mailflow.api.server import broker_unavailable

            return broker_unavailable(f"Kafka is not available ({exc})")
        if rec is not None:
            self.list.remember(rec, partition, offset)
        else:
            self.list.forget(domain, address, partition, offset)
        return None

    # ---- suppressions ----------------------------------------------------
    async def list_suppressions(self, request: web.Request) -> web.Response:
        from mailflow.api.server import broker_unavailable, json_response

        domain = request.query.get("domain", "").strip().lower()
        who = await self._who_for_domain(request, domain)
        if isinstance(who, web.Response):
            return who
        if not await self._current():
            return broker_unavailable("could not read the suppression list from Kafka")
        assert self.list is not None
        return json_response({"domain": domain, "suppressions": self.list.entries(domain)})

    async def add_suppression(self, request: web.Request) -> web.Response:
        from mailflow.api.server import json_response

        try:
            doc = await request.json()
        except ValueError:
            return self._err(400, "bad_json", "the body is not valid JSON")
        if not isinstance(doc, dict):
            return self._err(400, "invalid_input", "the body must be a JSON object", {"body": "not an object"})
        fields: dict[str, str] = {}
        for unknown in sorted(set(doc) - {"domain", "address", "note"}):
            fields[unknown] = "unknown field"
        domain = doc.get("domain")
        if not isinstance(domain, str) or not domain.strip():
            fields["domain"] = "a sender domain is required"
        address = doc.get("address")
        try:
            address = normalize_address(address) if isinstance(address, str) else None
        except AddressError as exc:
            fields["address"] = str(exc)
        if address is None and "address" not in fields:
            fields["address"] = "a recipient address is required"
        note = doc.get("note")
        if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
            fields["note"] = f"a string of at most {MAX_NOTE} characters"
        if fields:
            return self._err(400, "invalid_input", "; ".join(f"{k}: {v}" for k, v in fields.items()), fields)
        domain = str(domain).strip().lower()
        who = await self._who_for_domain(request, domain)
        if isinstance(who, web.Response):
            return who
        rec = entry(domain, str(address), "api", f"api:{who.id}", note=note)
        problem = await self._write(rec)
        return problem or json_response(rec, 201)

    async def delete_suppression(self, request: web.Request) -> web.Response:
        from mailflow.api.server import broker_unavailable, json_response

        domain = request.match_info["domain"].strip().lower()
        address = request.match_info["address"].strip()
        who = await self._who_for_domain(request, domain)
        if isinstance(who, web.Response):
            return who
        if not await self._current():
            return broker_unavailable("could not read the suppression list from Kafka")
        assert self.list is not None
        current = self.list.get(domain, address)
        if current is None:
            return self._err(404, "not_found", f"{address} is not suppressed for {domain}")
        problem = await self._write(None, domain, address)
        return problem or json_response({"deleted": current})

    # ---- one-click unsubscribe ----------------------------------------------
    def _token(self, request: web.Request) -> tuple[str, str] | None:
        assert self._key is not None
        return read_token(self._key, request.match_info["token"])

    async def unsubscribe_page(self, request: web.Request) -> web.Response:
        found = self._token(request)
        if found is None:
            return self._err(404, "not_found", "no such unsubscribe link")
        domain, rcpt = found
        page = (
            "<!doctype html><html><head><meta charset=utf-8><title>Unsubscribe</title></head><body>"
            f"<p>Stop mail from <b>{html.escape(domain)}</b> to <b>{html.escape(rcpt)}</b>?</p>"
            '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button></form></body></html>')
        return web.Response(text=page, content_type="text/html", headers={
            "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": "default-src 'none'; form-action 'self'"})

    async def unsubscribe(self, request: web.Request) -> web.Response:
        found = self._token(request)
        if found is None:
            return self._err(404, "not_found", "no such unsubscribe link")
        body = (await request.read())[:4096].decode("utf-8", "replace").strip()
        if ONE_CLICK not in body.replace("%3D", "=").split("&"):
            return self._err(400, "invalid_input", f"the body must be {ONE_CLICK} (RFC 8058)",
                             {"body": f"expected {ONE_CLICK}"})
        domain, rcpt = found
        assert self.list is not None
        if self.list.get(domain, rcpt) is None:  # a second click changes nothing
            problem = await self._write(entry(domain, rcpt, "unsubscribe", "one-click"))
            if problem is not None:
                return problem
        return web.Response(text="You are unsubscribed.\n", content_type="text/plain",
                            headers={"Cache-Control": "no-store"})


def register(app: web.Application, ing: Any) -> None:
    """Add the routes and their start-up and clean-up to the API's app."""
    c = Citizen(ing)
    app.on_startup.append(c.on_startup)
    app.on_cleanup.append(c.on_cleanup)
    app.router.add_get("/v1/suppressions", c.list_suppressions)
    app.router.add_post("/v1/suppressions", c.add_suppression)
    app.router.add_delete("/v1/suppressions/{domain}/{address}", c.delete_suppression)
    app.router.add_get("/v1/unsubscribe/{token}", c.unsubscribe_page)
    app.router.add_post("/v1/unsubscribe/{token}", c.unsubscribe)
    app["citizen"] = c
    from mailflow.api import webhooks

    webhooks.register(app, ing)
