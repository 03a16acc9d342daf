"""Producing to ``submissions`` directly, without the HTTP API.

The record's schema is ``schemas/submission.v1.json``. Example::

    from confluent_kafka import Producer
    from schemas.submission import make_submission, produce_submission

    producer = Producer({"bootstrap.servers": "127.0.0.1:9092", "acks": "all",
                         "enable.idempotence": True, "partitioner": "murmur2_random"})
    msg_id = produce_submission(producer, raw_rfc5322_bytes,
                                sender="app@example.com", recipients=["a@example.org"])
    producer.flush()

(That configuration is ``mailflow.kafka_io.producer_config(bootstrap)``: with
another partitioner a sender's records would land on other partitions than the
ingress's.)

The message must already be a complete RFC 5322 message (From, Date, Message-ID);
the validator stage rejects anything else to ``errors`` with a reason code. Bodies
over ~700 KB must go to the object store first and travel as ``body_ref``.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from typing import Any

from mailflow.ids import new_id
from schemas.mail import Submission

SCHEMA_FILE = "submission.v1.json"
MAX_INLINE = 700 * 1024  # keeps the record under Kafka's default 1 MB limit


def json_schema(name: str = SCHEMA_FILE) -> dict[str, Any]:
    """A JSON Schema file of this package: ``submission.v1.json`` unless `name` says
    another (``local.v1.json``, ``delivery.v1.json``...; see schemas/mail.py)."""
    doc: dict[str, Any] = json.loads(resources.files("schemas").joinpath(name).read_text())
    return doc


def make_submission(raw: bytes, *, sender: str, recipients: list[str],
                    msg_id: str | None = None, body_ref: str | None = None) -> tuple[str, bytes]:
    """(id, record value) for a message; `body_ref` instead of inline bytes if given."""
    if body_ref is None and len(raw) > MAX_INLINE:
        raise ValueError(f"message of {len(raw)} bytes: put it in the object store and pass body_ref")
    msg = Submission(id=msg_id or new_id(), sender=sender, recipients=list(recipients),
                     received_at=time.time(), size=len(raw),
                     body=None if body_ref else raw, body_ref=body_ref, source="kafka")
    return msg.id, msg.to_json()


def produce_submission(producer: Any, raw: bytes, *, sender: str, recipients: list[str],
                       topic: str = "mailflow.submissions", **kw: Any) -> str:
    """Queue one submission on a confluent-kafka Producer; returns its id.

    Call ``producer.flush()`` (or poll for the delivery report) before treating it
    as accepted: like the API, only a broker acknowledgement counts.
    """
    msg_id, value = make_submission(raw, sender=sender, recipients=recipients, **kw)
    producer.produce(topic, key=sender.encode(), value=value)
    return msg_id
