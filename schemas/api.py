"""The HTTP API's schema: the OpenAPI document served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

from schemas.states import State

# Message ids (mailflow/ids.py): Crockford base32, lower case, 26 digits.
ID_PATTERN = "^[0-9a-hjkmnp-tv-z]{26}$"
ADDRESS = {"type": "string", "minLength": 3, "description": "`addr` or `Name <addr>`"}
ADDRESS_LIST = {"oneOf": [ADDRESS, {"type": "array", "items": ADDRESS}]}

SUBMIT_JSON = {
    "type": "object",
    "additionalProperties": False,
    "required": ["from"],
    "properties": {
        "from": {**ADDRESS, "description": "Sender, `addr` or `Name <addr>`"},
        "to": ADDRESS_LIST, "cc": ADDRESS_LIST, "bcc": ADDRESS_LIST, "reply_to": ADDRESS_LIST,
        "subject": {"type": "string"},
        "text": {"type": "string"},
        "html": {"type": "string"},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        "attachments": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "required": ["filename", "content_base64"],
            "properties": {"filename": {"type": "string"}, "content_type": {"type": "string"},
                           "content_base64": {"type": "string", "contentEncoding": "base64"}}}},
    },
}

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"},
        "fields": {"type": "object", "additionalProperties": {"type": "string"}}}}},
}

ACCEPTED = {"type": "object", "required": ["id", "status_url"],
            "properties": {"id": {"type": "string"}, "status_url": {"type": "string"}}}

RECIPIENT_STATE = {"type": "object", "required": ["state", "ts"], "properties": {
    "state": {"type": "string", "enum": [s.value for s in State]},
    "ts": {"type": "number"}, "detail": {"type": "object"}, "waiting_on": {"type": "string"}}}

STATUS = {"type": "object", "required": ["id", "recipients", "timeline", "state"], "properties": {
    "id": {"type": "string"}, "sender": {"type": "string"}, "accepted_at": {"type": "number"},
    "state": {"type": "string"}, "final": {"type": "boolean"},
    "recipients": {"type": "object", "additionalProperties": RECIPIENT_STATE},
    "timeline": {"type": "array", "items": {"type": "object", "required": ["ts", "stage", "state"]}}}}

SUMMARY = {"type": "object", "required": ["id", "folder"], "properties": {
    "id": {"type": "string"}, "folder": {"type": "string"}, "sender": {"type": "string"},
    "recipients": {"type": "array", "items": {"type": "string"}},
    "subject": {"type": "string"}, "from": {"type": "string"}, "to": {"type": "string"},
    "date": {"type": "string"}, "size": {"type": "integer"}, "received_at": {"type": "number"}}}

LISTING = {"type": "object", "required": ["mailbox", "folder", "messages", "total"], "properties": {
    "mailbox": {"type": "string"}, "folder": {"type": "string"}, "total": {"type": "integer"},
    "next_cursor": {"type": ["string", "null"]}, "messages": {"type": "array", "items": SUMMARY}}}

MESSAGE = {"allOf": [SUMMARY, {"type": "object", "properties": {
    "text": {"type": ["string", "null"]},
    "html": {"type": ["string", "null"], "description": "The HTML part as sent: never render it as is"},
    "html_safe": {"type": "string", "description": "The HTML part sanitised (no scripts, handlers, "
                  "forms, frames or styles; remote images removed): show it in a sandboxed iframe"},
    "remote_blocked": {"type": "integer", "description": "Remote resources removed from html_safe"},
    "attachments": {"type": "array", "description": "In order: `.../attachments/{n}` downloads the n-th",
                    "items": {"type": "object", "properties": {
                        "filename": {"type": ["string", "null"]}, "content_type": {"type": "string"},
                        "size": {"type": "integer"}}}}}}]}

WHOAMI = {"type": "object", "required": ["id", "kind", "admin"], "properties": {
    "id": {"type": "string", "description": "The credential's public id"},
    "kind": {"type": "string", "enum": ["key", "token", "anonymous"]},
    "admin": {"type": "boolean", "description": "An API key for every domain (`*`), or MAILFLOW_AUTH=off"},
    "name": {"type": "string"},
    "address": {"type": "string", "description": "Mailbox tokens: the mailbox"},
    "domains": {"type": "array", "items": {"type": "string"}, "description": "API keys: sender domains"}}}

_SHAPE = {"type": "object", "required": ["total", "ages", "domains"], "properties": {
    "total": {"type": "integer"}, "partial": {"type": "boolean"},
    "ages": {"type": "object", "additionalProperties": {"type": "integer"},
             "description": "messages per age bucket (`buckets`), age since accepted"},
    "domains": {"type": "object", "additionalProperties": {"type": "object", "properties": {
        "total": {"type": "integer"}, "ages": {"type": "object"}}}}}}
QUEUE = {"type": "object", "required": ["ts", "buckets", "stages", "queues", "holds", "flushes", "bounces"],
         "description": "`mailflow queue show --json`: lag per stage; waiting mail by recipient domain and age",
         "properties": {
             "ts": {"type": "number"}, "buckets": {"type": "array", "items": {"type": "string"}},
             "stages": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                 "total": {"type": "integer"}, "oldest_age": {"type": ["number", "null"]},
                 "consumers": {"type": ["integer", "null"]},
                 "topics": {"type": "array", "items": {"type": "string"}}}}},
             "queues": {"type": "object", "properties": {"delivery": _SHAPE, "deferred": _SHAPE, "held": _SHAPE}},
             "holds": {"type": "array", "items": {"type": "object", "properties": {
                 "kind": {"type": "string", "enum": ["domain", "id"]}, "value": {"type": "string"},
                 "since": {"type": "number"}}}},
             "flushes": {"type": "array", "items": {"type": "object", "properties": {
                 "domain": {"type": ["string", "null"]}, "ts": {"type": "number"}}}},
             "bounces": {"type": "array", "items": {"type": "object", "properties": {
                 "id": {"type": "string"}, "ts": {"type": "number"}}}}}}

DOMAIN = {"type": "object", "required": ["domain", "selectors"],
          "description": "A sending domain: its DKIM selectors and the DNS records to publish "
                         "(`mailflow domains dns`); private keys are never in an answer",
          "properties": {"domain": {"type": "string"}, "selectors": {"type": "array", "items": {"type": "object"}},
                         "dns": {"type": "array", "items": {"type": "object"}}}}
SUPPRESSION = {"type": "object", "description": "(sender domain, recipient) -> why it is not mailed",
               "properties": {"domain": {"type": "string"}, "address": {"type": "string"},
                              "reason": {"type": "string"}, "source": {"type": "string"},
                              "ts": {"type": "number"}}}
WEBHOOK = {"type": "object", "required": ["id", "url", "events"],
           "properties": {"id": {"type": "string"}, "url": {"type": "string"},
                          "events": {"type": "array", "items": {"type": "string"}},
                          "secret": {"type": "string", "description": "Only in the 201 answer"}}}

AUTH_DESCRIPTION = """\
Every `/v1` request needs `Authorization: Bearer <credential>`:

* an **API key** `mf_<id>_<secret>` (`mailflow keys create --domains example.com`) sends as any
  address in its domains (`example.com`, `*.example.com` for subdomains, `*` for all: an admin
  key, which also reads every mailbox and status) and reads the status of mail sent from them;
* a **mailbox token** `mft_<id>_<secret>` (`mailflow mailboxes create ADDRESS`) sends only as
  its address and reads only its own mailbox and the status of its own mail.

The envelope sender and every `From:`/`Sender:` address must be ones the credential may send as
(a display name may differ): otherwise 403 and nothing is accepted. Without a valid credential:
401 with `WWW-Authenticate: Bearer`. `MAILFLOW_AUTH=off` turns checks off (local experiments).
"""


def _err(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _401() -> dict[str, Any]:
    return {**_err("No valid credential (missing, malformed, unknown or revoked)"),
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"},
                                             "description": "`Bearer realm=\"mailflow\"`"}}}


SECURED: list[dict[str, list[str]]] = [{"bearer": []}]
PUBLIC: list[dict[str, Any]] = []


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def openapi_document() -> dict[str, Any]:
    address = {"name": "address", "in": "path", "required": True, "schema": {"type": "string"},
               "description": "The mailbox's address; the local part matches case-insensitively"}
    msg_id = {"name": "id", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": ID_PATTERN},
              "description": "A message id: 26 characters of 0-9 and a-z without i, l, o, u"}
    unsub_token = {"name": "token", "in": "path", "required": True, "schema": {"type": "string"},
                   "description": "The token of a List-Unsubscribe link"}
    read_errors = {"400": _err("Not a mailbox address or not a message id"),
                   "401": _401(), "403": _err("Not this credential's mailbox"),
                   "404": _err("Not in this mailbox"), "503": _err("No store worker")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "mailflow", "version": "1",
                 "description": "Outbound mail pipeline on Kafka. 202 means Kafka has the message.\n\n"
                                + AUTH_DESCRIPTION},
        "security": SECURED,
        "paths": {
            "/v1/messages": {"post": {
                "summary": "Submit a message",
                "description": "JSON or a raw RFC 5322 message. Bcc is never in the stored or delivered "
                               "headers. JSON messages get our Message-ID; raw ones keep theirs if present.",
                "parameters": [
                    {"name": "Idempotency-Key", "in": "header", "required": False,
                     "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
                     "description": "Repeat-safe submission: the same key with the same request within "
                                    "24 h answers the first id and sends nothing; with a different "
                                    "request, 409. Scoped to the credential."},
                    {"name": "from", "in": "query", "required": False, "schema": {"type": "string"},
                     "description": "Envelope sender for message/rfc822 (default: From header)"},
                    {"name": "to", "in": "query", "required": False, "schema": {"type": "string"},
                     "description": "Comma-separated envelope recipients for message/rfc822 (default: To, Cc, Bcc)"}],
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Submission"}},
                    "message/rfc822": {"schema": {"type": "string", "format": "binary"}}}},
                "responses": {
                    "202": {**_ok("Accepted: Kafka acknowledged the message", "Accepted"),
                            "headers": {"Location": {"schema": {"type": "string"}},
                                        "Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]},
                                                                "description": "A repeat: nothing new was sent"}}},
                    "400": _err("Invalid input; `fields` names each bad field. A raw message's header "
                                "section must read one way only (RFC 5322, obsolete syntax refused)"),
                    "401": _401(),
                    "403": _err("The credential may not send as the envelope sender or a "
                                "From/Sender/Resent-From/Resent-Sender address"),
                    "408": _err("The body did not arrive within MAILFLOW_API_BODY_TIMEOUT"),
                    "409": _err("Idempotency-Key reused with a different request"),
                    "413": _err("Message too large"),
                    "415": _err("Unsupported media type"),
                    "429": _err("Sender over its rate limit; see Retry-After"),
                    "503": _err("Kafka unavailable; nothing was accepted")}}},
            "/v1/messages/{id}": {"get": {
                "summary": "A message's state per recipient and its timeline",
                "description": "Visible to an API key whose domains include the sender's, the sender's "
                               "mailbox token, and admin keys.",
                "parameters": [msg_id],
                "responses": {"200": _ok("Status", "Status"), "400": _err("Not a message id"), "401": _401(),
                              "403": _err("Not sent with this credential's addresses"),
                              "404": _err("Unknown id"), "503": _err("No status worker")}}},
            "/v1/whoami": {"get": {
                "summary": "The credential making the request",
                "responses": {"200": _ok("The credential", "Whoami"), "401": _401()}}},
            "/v1/queue": {"get": {
                "summary": "Waiting mail by stage, recipient domain and age; holds, flushes, bounce requests",
                "description": "Admin keys only. The same document as `mailflow queue show --json`.",
                "responses": {"200": _ok("The queue", "Queue"), "401": _401(),
                              "403": _err("Not an admin key"), "503": _err("Kafka unavailable")}}},
            "/v1/mailboxes/{address}/messages": {"get": {
                "summary": "A mailbox folder, newest first",
                "parameters": [address,
                               {"name": "folder", "in": "query", "schema": {"type": "string", "enum": ["inbox", "sent"]}},
                               {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                               {"name": "cursor", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": _ok("Listing", "Listing"),
                              **read_errors, "400": _err("Bad address, paging or folder")}}},
            "/v1/mailboxes/{address}/messages/{id}": {"get": {
                "summary": "One message: metadata and parsed parts",
                "parameters": [address, msg_id],
                "responses": {"200": _ok("Message", "Message"), **read_errors}}},
            "/v1/mailboxes/{address}/messages/{id}/raw": {"get": {
                "summary": "The message's RFC 5322 bytes",
                "parameters": [address, msg_id],
                "responses": {"200": {"description": "The message",
                                      "content": {"message/rfc822": {"schema": {"type": "string", "format": "binary"}}}},
                              **read_errors}}},
            "/v1/mailboxes/{address}/messages/{id}/attachments/{n}": {"get": {
                "summary": "One attachment's bytes, as a download",
                "description": "Always `application/octet-stream` with `Content-Disposition: attachment` "
                               "and `Content-Security-Policy: sandbox`; the part's own type is in "
                               "`X-Attachment-Content-Type`.",
                "parameters": [address, msg_id,
                               {"name": "n", "in": "path", "required": True,
                                "schema": {"type": "integer", "minimum": 0},
                                "description": "0-based, the order of the message's `attachments`"}],
                "responses": {"200": {"description": "The attachment",
                                      "headers": {"Content-Disposition": {"schema": {"type": "string"}},
                                                  "X-Attachment-Content-Type": {"schema": {"type": "string"}}},
                                      "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                              **read_errors, "400": _err("Bad address or id, or n is not a number")}}},
            "/v1/domains": {
                "get": {"summary": "Sending domains, their DKIM selectors and DNS records (admin)",
                        "responses": {"200": _ok("The domains", "Domains"), "401": _401(),
                                      "403": _err("Not an admin key"), "503": _err("Kafka unavailable")}},
                "post": {"summary": "Add a sending domain: new DKIM keys under a dated selector (admin)",
                         "description": "Private keys are sealed at rest and never returned.",
                         "requestBody": {"required": True, "content": {"application/json": {"schema": {
                             "type": "object", "required": ["domain"], "additionalProperties": False,
                             "properties": {"domain": {"type": "string", "minLength": 1},
                                            "ed25519": {"type": "boolean"}}}}}},
                         "responses": {"201": _ok("The domain", "Domain"), "400": _err("Not a domain"),
                                       "401": _401(), "403": _err("Not an admin key"),
                                       "409": _err("The domain has keys already"),
                                       "503": _err("Kafka unavailable; nothing was made")}}},
            "/v1/domains/{domain}": {"get": {
                "summary": "One sending domain (admin)",
                "parameters": [{"name": "domain", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _ok("The domain", "Domain"), "400": _err("Not a domain"), "401": _401(),
                              "403": _err("Not an admin key"), "404": _err("Not a sending domain"),
                              "503": _err("Kafka unavailable")}}},
            "/v1/suppressions": {
                "get": {"summary": "A sender domain's suppression list",
                        "description": "API keys whose domains include D (admin keys: any D).",
                        "parameters": [{"name": "domain", "in": "query", "required": True,
                                        "schema": {"type": "string", "minLength": 1}}],
                        "responses": {"200": _ok("The list", "Suppressions"), "400": _err("No domain"),
                                      "401": _401(), "403": _err("Not a domain of this credential"),
                                      "503": _err("Kafka unavailable")}},
                "post": {"summary": "Suppress a recipient for a sender domain",
                         "requestBody": {"required": True, "content": {"application/json": {"schema": {
                             "type": "object", "required": ["domain", "address"], "additionalProperties": False,
                             "properties": {"domain": {"type": "string", "minLength": 1},
                                            "address": {"type": "string", "minLength": 3},
                                            "note": {"type": "string"}}}}}},
                         "responses": {"201": _ok("The entry", "Suppression"), "400": _err("Invalid input"),
                                       "401": _401(), "403": _err("Not a domain of this credential"),
                                       "503": _err("Kafka unavailable")}}},
            "/v1/suppressions/{domain}/{address}": {"delete": {
                "summary": "Remove a suppression",
                "parameters": [{"name": "domain", "in": "path", "required": True, "schema": {"type": "string"}},
                               {"name": "address", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "Removed", "content": {"application/json": {"schema": {
                                  "type": "object", "properties": {"deleted": {"$ref": "#/components/schemas/Suppression"}}}}}},
                              "400": _err("No domain"), "401": _401(),
                              "403": _err("Not a domain of this credential"), "404": _err("Not suppressed"),
                              "503": _err("Kafka unavailable")}}},
            "/v1/unsubscribe/{token}": {
                "get": {"summary": "The confirmation page of a one-click link; changes nothing",
                        "security": PUBLIC, "parameters": [unsub_token],
                        "responses": {"200": {"description": "HTML",
                                              "content": {"text/html": {"schema": {"type": "string"}}}},
                                      "404": _err("No such link")}},
                "post": {"summary": "RFC 8058 one-click unsubscribe: suppresses the recipient for its sender domain",
                         "security": PUBLIC, "parameters": [unsub_token],
                         "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {
                             "schema": {"type": "object", "properties": {"List-Unsubscribe": {
                                 "type": "string", "enum": ["One-Click"]}}}}}},
                         "responses": {"200": {"description": "Unsubscribed",
                                               "content": {"text/plain": {"schema": {"type": "string"}}}},
                                       "400": _err("The body is not List-Unsubscribe=One-Click"),
                                       "404": _err("No such link"), "503": _err("Kafka unavailable")}}},
            "/v1/webhooks": {
                "get": {"summary": "This credential's webhooks (never their secrets)",
                        "responses": {"200": _ok("The webhooks", "Webhooks"), "401": _401(),
                                      "503": _err("Kafka unavailable")}},
                "post": {"summary": "Register a webhook; the answer holds its signing secret, shown once",
                         "description": "URLs that resolve to private, loopback or link-local addresses are "
                                        "refused unless MAILFLOW_WEBHOOK_ALLOW_PRIVATE=true. Each delivery is "
                                        "signed `Mailflow-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "
                                        "\"<t>.\" + body)>`.",
                         "requestBody": {"required": True, "content": {"application/json": {"schema": {
                             "type": "object", "required": ["url", "events"], "additionalProperties": False,
                             "properties": {"url": {"type": "string", "format": "uri"},
                                            "events": {"type": "array", "minItems": 1,
                                                       "items": {"type": "string"}}}}}}},
                         "responses": {"201": _ok("The webhook and its secret", "Webhook"),
                                       "400": _err("Invalid input"), "401": _401(),
                                       "503": _err("Kafka unavailable")}}},
            "/v1/webhooks/{id}": {"delete": {
                "summary": "Delete one of this credential's webhooks",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "Deleted", "content": {"application/json": {"schema": {
                                  "type": "object", "properties": {"deleted": {"$ref": "#/components/schemas/Webhook"}}}}}},
                              "401": _401(), "404": _err("No such webhook of this credential"),
                              "503": _err("Kafka unavailable")}}},
            "/healthz": {"get": {"summary": "Liveness", "security": PUBLIC, "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Readiness (broker reachable)", "security": PUBLIC,
                                "responses": {"200": {"description": "ready"}, "503": _err("Broker unreachable")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": PUBLIC,
                                 "responses": {"200": {"description": "text exposition format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "security": PUBLIC,
                                      "responses": {"200": {"description": "OpenAPI 3",
                                                            "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/": {"get": {"summary": "The webmail page", "security": PUBLIC,
                          "responses": {"200": {"description": "HTML",
                                                "content": {"text/html": {"schema": {"type": "string"}}}}}}},
            "/app.js": {"get": {"summary": "The webmail's script", "security": PUBLIC,
                                "responses": {"200": {"description": "JavaScript",
                                                      "content": {"text/javascript": {"schema": {"type": "string"}}}}}}},
            "/app.css": {"get": {"summary": "The webmail's style sheet", "security": PUBLIC,
                                 "responses": {"200": {"description": "CSS",
                                                       "content": {"text/css": {"schema": {"type": "string"}}}}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "bearerFormat": "mf_<id>_<secret> (API key) or mft_<id>_<secret> (mailbox token)",
                "description": AUTH_DESCRIPTION}},
            "schemas": {
                "Submission": SUBMIT_JSON, "Error": ERROR, "Accepted": ACCEPTED, "Status": STATUS,
                "Listing": LISTING, "Message": MESSAGE, "Whoami": WHOAMI, "Queue": QUEUE,
                "Domain": DOMAIN, "Domains": {"type": "object", "required": ["domains"], "properties": {
                    "domains": {"type": "array", "items": {"$ref": "#/components/schemas/Domain"}}}},
                "Suppression": SUPPRESSION, "Suppressions": {
                    "type": "object", "required": ["domain", "suppressions"], "properties": {
                        "domain": {"type": "string"},
                        "suppressions": {"type": "array", "items": {"$ref": "#/components/schemas/Suppression"}}}},
                "Webhook": WEBHOOK, "Webhooks": {"type": "object", "required": ["webhooks"], "properties": {
                    "webhooks": {"type": "array", "items": {"$ref": "#/components/schemas/Webhook"}}}}}},
    }
