"""The HTTP API's schema: the OpenAPI document served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

ADDRESS_LIST = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}

SUBMIT_JSON = {
    "type": "object",
    "additionalProperties": False,
    "required": ["from"],
    "properties": {
        "from": {"type": "string", "description": "Sender, `addr` or `Name <addr>`"},
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
    "state": {"type": "string", "enum": [
        "accepted", "validated", "rate_limited", "rejected", "stored", "scanned", "quarantined",
        "sent_folder", "deferred", "delivered", "bounced", "suppressed"]},
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


SECURED = [{"bearer": []}]
PUBLIC: list[dict[str, Any]] = []


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def openapi_document() -> dict[str, Any]:
    address = {"name": "address", "in": "path", "required": True, "schema": {"type": "string"}}
    msg_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    read_errors = {"401": _401(), "403": _err("Not this credential's mailbox"),
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
                    "400": _err("Invalid input; `fields` names each bad field"),
                    "401": _401(),
                    "403": _err("The credential may not send as the envelope sender or a From/Sender address"),
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
                "responses": {"200": _ok("Status", "Status"), "401": _401(),
                              "403": _err("Not sent with this credential's addresses"),
                              "404": _err("Unknown id"), "503": _err("No status worker")}}},
            "/v1/whoami": {"get": {
                "summary": "The credential making the request",
                "responses": {"200": _ok("The credential", "Whoami"), "401": _401()}}},
            "/v1/mailboxes/{address}/messages": {"get": {
                "summary": "A mailbox folder, newest first",
                "parameters": [address,
                               {"name": "folder", "in": "query", "schema": {"type": "string", "enum": ["inbox", "sent"]}},
                               {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                               {"name": "cursor", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": _ok("Listing", "Listing"), "400": _err("Bad paging or folder"),
                              **read_errors}}},
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
                              "400": _err("n is not a number"), **read_errors}}},
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
                "Listing": LISTING, "Message": MESSAGE, "Whoami": WHOAMI}},
    }
