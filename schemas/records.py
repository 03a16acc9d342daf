"""Records that travel on the topics, and their strict parsers.

Every topic carries JSON (orjson). The stages trust nothing they read: `parse_*`
raise `PoisonPill` with a reason for anything that does not fit, and the stage
sends the raw bytes to ``errors`` instead of crashing.

The ``submissions`` record is a public, versioned interface; its JSON Schema is
``schemas/submission.v1.json`` and `schemas.submission` has a helper to produce it.

`Message` reads and writes every mail topic alike, its ``meta`` a free-form dict;
`schemas.mail` has one typed record per mail topic over the same JSON (and the
table of topics, types and schema files). `Event` and `ErrorRecord` are the
``events`` and ``errors`` records (``event.v1.json``, ``error.v1.json``); a record
on ``events`` holds one event or a batch of them (``event-batch.v1.json``,
`parse_events`).
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

SUBMISSION_VERSION = 1


class PoisonPill(ValueError):
    """A record that cannot be processed; `reason` is a short machine code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _loads(raw: bytes | str | None) -> dict[str, Any]:
    if raw is None:
        raise PoisonPill("empty_record")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PoisonPill("not_json", str(exc)) from None
    if not isinstance(obj, dict):
        raise PoisonPill("not_an_object")
    return obj


def _str(obj: dict[str, Any], name: str, *, optional: bool = False) -> str | None:
    value = obj.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise PoisonPill("bad_field", f"{name} must be a non-empty string")
    return value


@dataclass
class Message:
    """One message on its way: submissions, admitted, outgoing, clean, local.

    The RFC 5322 bytes travel inline (`body`, base64 in JSON) up to a threshold,
    above it by reference to the object store (`body_ref`, the claim check).
    `recipients` is the envelope: on ``local`` it is the one mailbox the record is for.
    """

    id: str
    sender: str  # envelope sender; "" is the null reverse-path of a bounce
    recipients: list[str]
    received_at: float
    size: int
    body: bytes | None = None
    body_ref: str | None = None
    version: int = SUBMISSION_VERSION
    source: str = "api"
    mailbox: str | None = None  # on `local`: whose mailbox
    folder: str | None = None  # on `local`: inbox | sent
    meta: dict[str, Any] = field(default_factory=dict)  # stage annotations (scan verdict...)

    def to_json(self) -> bytes:
        # A shallow view, not dataclasses.asdict: asdict deep-copies meta and the
        # recipient list on every record, a tenth of a simple stage's CPU.
        d = {k: v for k, v in self.__dict__.items() if v is not None}
        if self.body is not None:
            d["body"] = base64.b64encode(self.body).decode()
        return orjson.dumps(d)

    def with_(self, **changes: Any) -> Message:
        d = {**self.__dict__, **changes}
        return Message(**d)


def parse_message(raw: bytes | str | None) -> Message:
    """Any mail record as a `Message`, checked as the typed records of `schemas.mail`
    check their envelope (one set of rules: `schemas.mail._envelope`)."""
    from schemas.mail import _envelope  # schemas.mail builds on this module

    obj = _loads(raw)
    mailbox, folder = obj.get("mailbox"), obj.get("folder")
    env, _, meta = _envelope(obj)
    return Message(
        id=env["id"], sender=env["sender"], recipients=env["recipients"],
        received_at=env["received_at"], size=env["size"], body=env["body"],
        body_ref=env["body_ref"], source=env["source"], mailbox=mailbox, folder=folder,
        meta=meta,
    )


@dataclass
class Event:
    """A state change of a message, on ``events`` keyed by message id.

    `recipients` None means every recipient of the message.
    """

    id: str
    state: str
    stage: str
    ts: float = field(default_factory=time.time)
    recipients: list[str] | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    sender: str | None = None

    def to_json(self) -> bytes:
        return orjson.dumps({k: v for k, v in self.__dict__.items() if v is not None})


def parse_event(raw: bytes | str | None) -> Event:
    """One event record (``event.v1.json``)."""
    return _event(_loads(raw))


def parse_events(raw: bytes | str | None) -> list[Event]:
    """Every event of an ``events`` record, in order: one event (``event.v1.json``)
    or an event batch (``{"events": [...]}``, ``event-batch.v1.json``, what the
    stages write when a turn of their loop makes several events for one partition:
    `streams.events`). A batch with one item that does not fit is poison whole:
    only a writer other than mailflow's runtime makes one."""
    obj = _loads(raw)
    if "events" not in obj:
        return [_event(obj)]
    items = obj["events"]
    if not isinstance(items, list) or not items:
        raise PoisonPill("bad_field", "events must be a non-empty list of events")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise PoisonPill("bad_field", f"events[{i}] must be an object")
        try:
            out.append(_event(item))
        except PoisonPill as pill:
            raise PoisonPill(pill.reason, f"events[{i}]: {pill.detail}") from None
    return out


def event_dicts(raw: bytes | str | None) -> list[dict[str, Any]]:
    """The events of an ``events`` record as plain dicts, unchecked (the benchmarks'
    and checks' followers, which read only what mailflow wrote)."""
    obj = orjson.loads(raw or b"{}")
    return obj["events"] if "events" in obj else [obj]


def _event(obj: dict[str, Any]) -> Event:
    state = _str(obj, "state")
    rcpts = obj.get("recipients")
    if rcpts is not None and not (isinstance(rcpts, list) and all(isinstance(r, str) for r in rcpts)):
        raise PoisonPill("bad_field", "recipients must be a list of strings")
    detail = obj.get("detail") or {}
    if not isinstance(detail, dict):
        raise PoisonPill("bad_field", "detail must be an object")
    ts = obj.get("ts")
    return Event(
        id=_str(obj, "id") or "", state=state or "", stage=str(obj.get("stage", "?")),
        ts=float(ts) if isinstance(ts, int | float) else time.time(),
        recipients=rcpts, detail=detail,
        sender=obj.get("sender") if isinstance(obj.get("sender"), str) else None,
    )


@dataclass
class ErrorRecord:
    """A parked message on ``errors``: why, where, and the record as it was."""

    stage: str
    reason: str
    state: str  # rejected | rate_limited | quarantined | poison
    detail: str = ""
    id: str | None = None
    ts: float = field(default_factory=time.time)
    record: str | None = None  # the original record (JSON text), to replay it

    def to_json(self) -> bytes:
        return orjson.dumps({k: v for k, v in self.__dict__.items() if v is not None})


def parse_error(raw: bytes | str | None) -> ErrorRecord:
    obj = _loads(raw)
    return ErrorRecord(
        stage=str(obj.get("stage", "?")), reason=str(obj.get("reason", "?")),
        state=str(obj.get("state", "?")), detail=str(obj.get("detail", "")),
        id=obj.get("id"), ts=float(obj.get("ts", 0)), record=obj.get("record"),
    )
