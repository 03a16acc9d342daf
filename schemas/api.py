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
        "sent_folder", "deferred", "delivered", "bounced"]},
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
    "text": {"type": ["string", "null"]}, "html": {"type": ["string", "null"]},
    "attachments": {"type": "array", "items": {"type": "object"}}}}]}


def _err(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def openapi_document() -> dict[str, Any]:
    address = {"name": "address", "in": "path", "required": True, "schema": {"type": "string"}}
    msg_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "mailflow", "version": "1",
                 "description": "Outbound mail pipeline on Kafka. 202 means Kafka has the message."},
        "paths": {
            "/v1/messages": {"post": {
                "summary": "Submit a message",
                "parameters": [
                    {"name": "from", "in": "query", "required": False, "schema": {"type": "string"},
                     "description": "Envelope sender for message/rfc822 (default: From header)"},
                    {"name": "to", "in": "query", "required": False, "schema": {"type": "string"},
                     "description": "Comma-separated envelope recipients for message/rfc822 (default: To, Cc, Bcc)"}],
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Submission"}},
                    "message/rfc822": {"schema": {"type": "string", "format": "binary"}}}},
                "responses": {
                    "202": _ok("Accepted: Kafka acknowledged the message", "Accepted"),
                    "400": _err("Invalid input; `fields` names each bad field"),
                    "413": _err("Message too large"),
                    "415": _err("Unsupported media type"),
                    "429": _err("Sender over its rate limit; see Retry-After"),
                    "503": _err("Kafka unavailable; nothing was accepted")}}},
            "/v1/messages/{id}": {"get": {
                "summary": "A message's state per recipient and its timeline",
                "parameters": [msg_id],
                "responses": {"200": _ok("Status", "Status"), "404": _err("Unknown id"),
                              "503": _err("No status worker")}}},
            "/v1/mailboxes/{address}/messages": {"get": {
                "summary": "A mailbox folder, newest first",
                "parameters": [address,
                               {"name": "folder", "in": "query", "schema": {"type": "string", "enum": ["inbox", "sent"]}},
                               {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                               {"name": "cursor", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": _ok("Listing", "Listing"), "400": _err("Bad paging or folder"),
                              "503": _err("No store worker")}}},
            "/v1/mailboxes/{address}/messages/{id}": {"get": {
                "summary": "One message: metadata and parsed parts",
                "parameters": [address, msg_id],
                "responses": {"200": _ok("Message", "Message"), "404": _err("Not in this mailbox"),
                              "503": _err("No store worker")}}},
            "/v1/mailboxes/{address}/messages/{id}/raw": {"get": {
                "summary": "The message's RFC 5322 bytes",
                "parameters": [address, msg_id],
                "responses": {"200": {"description": "The message",
                                      "content": {"message/rfc822": {"schema": {"type": "string", "format": "binary"}}}},
                              "404": _err("Not in this mailbox"), "503": _err("No store worker")}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Readiness (broker reachable)",
                                "responses": {"200": {"description": "ready"}, "503": _err("Broker unreachable")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "text exposition format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document",
                                      "responses": {"200": {"description": "OpenAPI 3",
                                                            "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/": {"get": {"summary": "The webmail page",
                          "responses": {"200": {"description": "HTML",
                                                "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": {
            "Submission": SUBMIT_JSON, "Error": ERROR, "Accepted": ACCEPTED, "Status": STATUS,
            "Listing": LISTING, "Message": MESSAGE}},
    }
