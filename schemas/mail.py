"""Typed mail records: one type per topic, over the JSON the topics carry today.

    topic                          type        parser             JSON Schema
    submissions, admitted          Submission  parse_submission   submission.v1.json
    local                          LocalCopy   parse_local        local.v1.json
    outgoing, clean                Outgoing    parse_outgoing     outgoing.v1.json
    delivery, retry.hold, dead     Delivery    parse_delivery     delivery.v1.json
    retry.1 ... retry.N            Delivery    parse_deferred     delivery.v1.json#/$defs/deferred
    events                         Event       parse_event        event.v1.json     (schemas.records)
    events (a batch)               Event       parse_events       event-batch.v1.json (schemas.records)
    errors                         ErrorRecord parse_error        error.v1.json     (schemas.records)

The wire format is the one `schemas.records.Message` reads and writes, unchanged:
a record written by these types parses as a `Message` and the other way round, so
replays, dashboards and records already on the topics keep working. What the
stages used to keep in the free-form ``meta`` object is typed here: each type
declares the ``meta`` keys its topic's reader uses (`META_KEYS`) as attributes of
the same name (``meta.dkim`` is `dkim`, ``meta.scan`` a `ScanVerdict`); on
`Delivery` the deliver and retry stages' bookkeeping (``attempt``, ``due``,
``tier``, ``history``, ``held_at``, ``dead``...) is one `RetryState`. Every other
``meta`` key rides in `meta_extra`, every unknown top-level key in `extra`, so
nothing is dropped on the way through a stage; `meta` gives the whole object as
it goes on the wire.

`None` means "absent on the wire": a record that was never tried has no
``attempt`` key, and writing it back adds none. A key present with JSON null is
read as absent. A typed key of the wrong type, like anything else that does not
fit, raises `PoisonPill` with a reason (``bad_field``, ``unsupported_version``,
``not_json``...), which the stage parks on ``errors`` as before.

Moving a record from one topic's type to the next (`MailRecord.to`) keeps every
key: one type's typed attribute becomes another's `meta_extra` entry and back.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import orjson

from schemas.records import SUBMISSION_VERSION, PoisonPill, _loads

LOCAL_FOLDERS = ("inbox", "sent")  # mailflow.rules.mailbox.FOLDERS
MAX_HISTORY = 30  # entries of `RetryState.history` kept (the deliver stage's limit)

# The record's own keys, in the order `Message.to_json` writes them.
_ENVELOPE = ("id", "sender", "recipients", "received_at", "size", "body", "body_ref",
             "version", "source")
_KNOWN = frozenset((*_ENVELOPE, "meta"))

R = TypeVar("R", bound="MailRecord")


def _bad(name: str, what: str) -> PoisonPill:
    return PoisonPill("bad_field", f"{name} must be {what}")


def _number(name: str, value: Any) -> float:
    # bool is an int in Python, never a time or a count on the wire.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, "a number")
    return float(value)


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "an integer")
    return value


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _bad(name, "a string")
    return value


def _nonempty(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(name, "a non-empty string")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, "true or false")
    return value


def _text_map(name: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _bad(name, "an object of strings")
    return value


def _summary(name: str, value: Any) -> dict[str, str | bool]:
    if not isinstance(value, dict) or not all(isinstance(v, str | bool) for v in value.values()):
        raise _bad(name, "an object of strings and booleans")
    return value


def _objects(name: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _bad(name, "a list of objects")
    return value


# --------------------------------------------------------------------------- meta parts


@dataclass(slots=True)
class ScanVerdict:
    """``meta.scan``, written by the scan stage on every ``clean`` record.

    `scanned` False: passed on unscanned (``SCAN_FAILURE=open``, or no scanner
    configured), `reason` says why when a scanner failed. `detail` is the rest of
    the verdict as the scanners gave it (``spam_score``, ``spam_action``...).
    """

    scanned: bool
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any) -> ScanVerdict:
        if not isinstance(value, dict):
            raise _bad("meta.scan", "an object")
        rest = dict(value)
        scanned = _flag("meta.scan.scanned", rest.pop("scanned", None))
        reason = rest.pop("reason", None)
        return cls(scanned, None if reason is None else _text("meta.scan.reason", reason), rest)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scanned": self.scanned}
        if self.reason is not None:
            out["reason"] = self.reason
        out.update(self.detail)
        return out


@dataclass(slots=True)
class DeadLetter:
    """``meta.dead`` of a ``dead`` record: why (``permanent``, ``expired``,
    ``operator``), when, and each failed recipient's last outcome (the fields of
    `mailflow.rules.delivery.Outcome`: recipient, kind, code, reply, host, tls)."""

    reason: str
    ts: float
    failed: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any) -> DeadLetter:
        if not isinstance(value, dict):
            raise _bad("meta.dead", "an object")
        rest = dict(value)
        reason = _text("meta.dead.reason", rest.pop("reason", None))
        ts = _number("meta.dead.ts", rest.pop("ts", None))
        failed = _objects("meta.dead.failed", rest.pop("failed", []))
        return cls(reason, ts, failed, rest)

    def to_wire(self) -> dict[str, Any]:
        return {"reason": self.reason, "failed": self.failed, "ts": self.ts, **self.extra}


@dataclass(slots=True)
class RetryState:
    """The deliver and retry stages' bookkeeping on a `Delivery` record (``meta``).

    attempt        attempts spent (a shaped or rate-limited step-aside spends none)
    first_attempt  when the first attempt began: the queue age counts from it
                   (MAX_QUEUE_AGE), moved forward by the time spent held
    last_error     the reply of the last failed attempt
    due, tier      on ``retry.N``: when the record is due, and N
    history        one entry per attempt, hold and final failure (``ts`` first),
                   the last `MAX_HISTORY`
    held_at        on ``retry.hold``: when an operator's hold first caught it
    replayed_at    when `mailflow replay dead` put it back (the ledger then lets a
                   permanently failed recipient be tried once more)
    dead           on ``dead``: the end, `DeadLetter`
    """

    attempt: int | None = None
    first_attempt: float | None = None
    last_error: str | None = None
    due: float | None = None
    tier: int | None = None
    history: list[dict[str, Any]] | None = None
    held_at: float | None = None
    replayed_at: float | None = None
    dead: DeadLetter | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("attempt", "first_attempt", "last_error", "due", "tier",
                                       "history", "held_at", "replayed_at", "dead")

    @classmethod
    def take(cls, meta: dict[str, Any]) -> RetryState:
        """The state from a ``meta`` object, removing its keys from `meta`."""
        if meta.keys().isdisjoint(cls.KEYS):  # most records: never tried yet
            return cls()
        g = meta.pop
        attempt, first, last, due, tier, history, held, replayed, dead = (
            g(k, None) for k in cls.KEYS)
        return cls(
            attempt=None if attempt is None else _int("meta.attempt", attempt),
            first_attempt=None if first is None else _number("meta.first_attempt", first),
            last_error=None if last is None else _text("meta.last_error", last),
            due=None if due is None else _number("meta.due", due),
            tier=None if tier is None else _int("meta.tier", tier),
            history=None if history is None else _objects("meta.history", history),
            held_at=None if held is None else _number("meta.held_at", held),
            replayed_at=None if replayed is None else _number("meta.replayed_at", replayed),
            dead=None if dead is None else DeadLetter.parse(dead),
        )

    def put(self, meta: dict[str, Any]) -> None:
        """Write the state's keys that are set into a ``meta`` object."""
        for k, v in zip(self.KEYS, _RETRY_VALUES(self), strict=True):
            if v is not None:
                meta[k] = v.to_wire() if k == "dead" else v

    def with_(self, **changes: Any) -> RetryState:
        return dataclasses.replace(self, **changes)

    def add_history(self, entry: dict[str, Any]) -> list[dict[str, Any]]:
        """The history with `entry` appended, the last `MAX_HISTORY` entries."""
        return [*(self.history or []), entry][-MAX_HISTORY:]


_RETRY_VALUES = operator.attrgetter(*RetryState.KEYS)

# How each typed ``meta`` key is read (a PoisonPill when it does not fit) and, when
# it is not plain JSON, written.
_META_PARSE: dict[str, Callable[[str, Any], Any]] = {
    "unsubscribe": _text_map,  # recipient -> RFC 8058 link (API; mailflow/rules/unsubscribe.py)
    "dkim": _nonempty,  # DKIM-Signature lines (sentfolder; deliver's bounces)
    "dkim_rcpt": _text_map,  # recipient -> its own DKIM-Signature lines (sentfolder)
    "summary": _summary,  # what a mailbox listing shows (validate; mailrules.summarize)
    "scan": lambda _name, v: ScanVerdict.parse(v),  # scan
    "bounce": _flag,  # a delivery status notification made by deliver
    "bounce_of": _nonempty,  # the id of the message it reports on
    "domain": _nonempty,  # the recipient domain of a delivery record (sentfolder, deliver, replay)
}
_META_WIRE: dict[str, Callable[[Any], Any]] = {"scan": lambda v: v.to_wire()}


# --------------------------------------------------------------------------- the records


@dataclass(kw_only=True, slots=True)
class MailRecord:
    """What every mail record has: the envelope and where the message bytes are.

    The RFC 5322 bytes travel inline (`body`, base64 on the wire) up to a threshold,
    above it by reference to the object store (`body_ref`, the claim check): one of
    the two is set. `sender` "" is the null reverse-path of a bounce.
    """

    META_KEYS: ClassVar[tuple[str, ...]] = ()

    id: str
    sender: str
    recipients: list[str]
    received_at: float
    size: int
    body: bytes | None = None
    body_ref: str | None = None
    version: int = SUBMISSION_VERSION
    source: str = "api"
    meta_extra: dict[str, Any] = field(default_factory=dict)  # meta keys not typed here
    extra: dict[str, Any] = field(default_factory=dict)  # top-level keys not typed here

    # ---- the wire
    def _meta_into(self, meta: dict[str, Any]) -> None:
        for k in self.META_KEYS:
            v = getattr(self, k)
            if v is not None:
                wire = _META_WIRE.get(k)
                meta[k] = wire(v) if wire else v

    @property
    def meta(self) -> dict[str, Any]:
        """The ``meta`` object as it goes on the wire (a new dict: edit the fields)."""
        meta: dict[str, Any] = {}
        self._meta_into(meta)
        meta.update(self.meta_extra)
        return meta

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON object (the body base64), keys as `Message` writes them."""
        d: dict[str, Any] = {"id": self.id, "sender": self.sender, "recipients": self.recipients,
                             "received_at": self.received_at, "size": self.size}
        if self.body is not None:
            d["body"] = base64.b64encode(self.body).decode()
        if self.body_ref is not None:
            d["body_ref"] = self.body_ref
        d["version"] = self.version
        d["source"] = self.source
        if self.extra:
            d.update(self.extra)
        self._local_into(d)
        d["meta"] = self.meta
        return d

    def _local_into(self, d: dict[str, Any]) -> None:
        pass

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    # ---- changes
    def with_(self: R, **changes: Any) -> R:
        """A copy with `changes` (field names), the same type."""
        return dataclasses.replace(self, **changes)

    def to(self, cls: type[R], **changes: Any) -> R:
        """This record as the record of another topic (`cls`), with `changes`.

        Every key is kept: ``meta`` keys that `cls` types become its attributes, the
        others go to its `meta_extra`; `changes` name `cls`'s fields and win."""
        env = {k: getattr(self, k) for k in _ENVELOPE}
        return cls._build(env, self._top_extra(), self.meta, changes)

    def _top_extra(self) -> dict[str, Any]:
        return dict(self.extra)

    @classmethod
    def _build(cls: type[R], env: dict[str, Any], extra: dict[str, Any],
               meta: dict[str, Any], over: dict[str, Any]) -> R:
        """An instance from checked envelope fields, the other top-level keys and a
        ``meta`` object (both consumed: what the type types is taken out of them),
        with `over` (field values) winning over what they say."""
        typed: dict[str, Any] = {}
        for k in cls.META_KEYS:
            if k in meta:
                v = meta.pop(k)
                if v is not None and k not in over:
                    typed[k] = _META_PARSE[k](f"meta.{k}", v)
        own = cls._own(extra, meta, over)
        if over:
            rec = cls(**{**env, **typed, **own, "meta_extra": meta, "extra": extra, **over})
        else:
            rec = cls(**env, **typed, **own, meta_extra=meta, extra=extra)
        rec._check()
        return rec

    @classmethod
    def _own(cls, extra: dict[str, Any], meta: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        """The type's own fields, taken out of the top-level keys and ``meta``."""
        return {}

    def _check(self) -> None:
        """What the type requires beyond its fields' types; `PoisonPill` if not met."""

    @classmethod
    def parse(cls: type[R], raw: bytes | str | None) -> R:
        """The record from the wire; `PoisonPill` with a reason if it does not fit."""
        obj = _loads(raw)
        env, extra, meta = _envelope(obj)
        return cls._build(env, extra, meta, {})


@dataclass(kw_only=True, slots=True)
class Submission(MailRecord):
    """On ``submissions`` (key: sender) and ``admitted`` (the same record, let through
    by the rate limiter; also the deliver stage's bounces for a local sender).

    `unsubscribe`: recipient -> one-click unsubscribe link (API). `bounce`,
    `bounce_of`, `dkim`: on a bounce made by the deliver stage, signed there."""

    META_KEYS: ClassVar[tuple[str, ...]] = ("unsubscribe", "bounce", "bounce_of", "dkim")

    unsubscribe: dict[str, str] | None = None
    bounce: bool | None = None
    bounce_of: str | None = None
    dkim: str | None = None


@dataclass(kw_only=True, slots=True)
class LocalCopy(MailRecord):
    """On ``local`` (key: mailbox): one copy for one mailbox's folder (``inbox``, or
    ``sent`` for a local sender's Sent copy). The body is always by reference
    (the validator or the sent-folder stage put it in the object store once).

    `recipients` are the ones this copy is for, as addressed; `summary` is what the
    mailbox listing shows (validate)."""

    META_KEYS: ClassVar[tuple[str, ...]] = ("summary", "bounce", "bounce_of")

    mailbox: str
    folder: str
    summary: dict[str, str | bool] | None = None
    bounce: bool | None = None
    bounce_of: str | None = None

    def _check(self) -> None:
        if (not isinstance(self.mailbox, str) or not self.mailbox or self.folder not in LOCAL_FOLDERS
                or not self.body_ref or self.body is not None):
            raise PoisonPill("bad_field", "local records need mailbox, folder and body_ref")

    def _local_into(self, d: dict[str, Any]) -> None:
        d["mailbox"] = self.mailbox
        d["folder"] = self.folder

    def _top_extra(self) -> dict[str, Any]:
        return {**self.extra, "mailbox": self.mailbox, "folder": self.folder}

    @classmethod
    def _own(cls, extra: dict[str, Any], meta: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        return {"mailbox": extra.pop("mailbox", None), "folder": extra.pop("folder", None)}


@dataclass(kw_only=True, slots=True)
class Outgoing(MailRecord):
    """On ``outgoing`` (key: message id; the remote recipients, from validate) and
    ``clean`` (the same after the scan stage, with its `scan` verdict).

    `dkim`/`dkim_rcpt` are set by the sent-folder stage, which signs the record it
    read before it becomes the ``delivery`` records and the Sent copy (`to`)."""

    META_KEYS: ClassVar[tuple[str, ...]] = ("unsubscribe", "summary", "scan", "bounce", "bounce_of",
                                            "dkim", "dkim_rcpt")

    unsubscribe: dict[str, str] | None = None
    summary: dict[str, str | bool] | None = None
    scan: ScanVerdict | None = None
    bounce: bool | None = None
    bounce_of: str | None = None
    dkim: str | None = None
    dkim_rcpt: dict[str, str] | None = None


@dataclass(kw_only=True, slots=True)
class Delivery(MailRecord):
    """On ``delivery`` (key: recipient domain), ``retry.1..N``, ``retry.hold`` (key:
    domain) and ``dead`` (key: message id): one (message, domain) record.

    `domain`: the recipient domain (set by every writer; `route_domain` falls back
    to the first recipient's). `dkim`/`dkim_rcpt`: the signature lines sent in front
    of the body on every attempt. `retry`: the attempts so far (`RetryState`)."""

    META_KEYS: ClassVar[tuple[str, ...]] = ("domain", "unsubscribe", "dkim", "dkim_rcpt",
                                            "bounce", "bounce_of")

    domain: str | None = None
    unsubscribe: dict[str, str] | None = None
    dkim: str | None = None
    dkim_rcpt: dict[str, str] | None = None
    bounce: bool | None = None
    bounce_of: str | None = None
    retry: RetryState = field(default_factory=RetryState)

    @classmethod
    def _own(cls, extra: dict[str, Any], meta: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        retry = RetryState.take(meta)  # always out of meta_extra, even when `over` replaces it
        return {"retry": retry}

    def _meta_into(self, meta: dict[str, Any]) -> None:
        MailRecord._meta_into(self, meta)
        self.retry.put(meta)

    def route_domain(self) -> str:
        """The domain this record is for: `domain`, else the first recipient's."""
        return self.domain or self.recipients[0].rpartition("@")[2].lower()


# --------------------------------------------------------------------------- parsing


def _envelope(obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(envelope fields, other top-level keys, a copy of ``meta``) of a mail record,
    checked as `schemas.records.parse_message` checks them."""
    version = obj.get("version")
    if version != SUBMISSION_VERSION:
        raise PoisonPill("unsupported_version", f"version {version!r}, expected {SUBMISSION_VERSION}")
    msg_id = obj.get("id")
    if not isinstance(msg_id, str) or not msg_id:
        raise PoisonPill("bad_field", "id must be a non-empty string")
    sender = obj.get("sender")
    if not isinstance(sender, str):
        raise PoisonPill("bad_field", "sender must be a string")
    rcpts = obj.get("recipients")
    if not isinstance(rcpts, list) or not rcpts or not all(isinstance(r, str) and r for r in rcpts):
        raise PoisonPill("bad_field", "recipients must be a non-empty list of strings")
    received_at = obj.get("received_at", time.time())
    size = obj.get("size")
    if (isinstance(received_at, bool) or not isinstance(received_at, int | float)
            or isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise PoisonPill("bad_field", "received_at must be a number and size an integer")
    body_b64, body_ref = obj.get("body"), obj.get("body_ref")
    body = None
    if body_b64 is not None:
        if not isinstance(body_b64, str):
            raise PoisonPill("bad_field", "body must be base64 text")
        try:
            body = base64.b64decode(body_b64, validate=True)
        except binascii.Error:
            raise PoisonPill("bad_field", "body is not valid base64") from None
        body_ref = None  # as Message: an inline body wins
    elif not isinstance(body_ref, str) or not body_ref:
        raise PoisonPill("bad_field", "one of body or body_ref is required")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise PoisonPill("bad_field", "meta must be an object")
    source = obj.get("source", "kafka")
    extra = {} if obj.keys() <= _KNOWN else {k: v for k, v in obj.items() if k not in _KNOWN}
    env = {"id": msg_id, "sender": sender, "recipients": list(rcpts),
           "received_at": float(received_at), "size": size, "body": body, "body_ref": body_ref,
           "version": SUBMISSION_VERSION, "source": source if isinstance(source, str) else str(source)}
    return env, extra, meta  # `obj` is ours (fresh from _loads): its meta may be consumed


def parse_submission(raw: bytes | str | None) -> Submission:
    """A ``submissions`` or ``admitted`` record."""
    return Submission.parse(raw)


def parse_local(raw: bytes | str | None) -> LocalCopy:
    """A ``local`` record: mailbox, folder (inbox|sent) and body_ref required."""
    return LocalCopy.parse(raw)


def parse_outgoing(raw: bytes | str | None) -> Outgoing:
    """An ``outgoing`` or ``clean`` record."""
    return Outgoing.parse(raw)


def parse_delivery(raw: bytes | str | None) -> Delivery:
    """A ``delivery``, ``retry.hold`` or ``dead`` record."""
    return Delivery.parse(raw)


def parse_deferred(raw: bytes | str | None) -> Delivery:
    """A ``retry.N`` record: a `Delivery` that says when it is due (``meta.due``)."""
    rec = Delivery.parse(raw)
    if rec.retry.due is None:
        raise PoisonPill("bad_field", "a deferred record needs meta.due")
    return rec
