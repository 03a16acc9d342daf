"""The states a recipient of a message can be in, declared once.

Every ``events`` record names one (`schemas.records.Event.state`); the status
stage keeps the latest per recipient and ``GET /v1/messages/{id}`` shows it. A
recipient reaches exactly one of the `FINAL` states; the others say where it
waits. `State` is a `str` enumeration, so its members compare, hash and serialize
as the plain strings the records carry: ``"delivered" in FINAL`` holds.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """Every state an ``events`` record may carry."""

    ACCEPTED = "accepted"  # on submissions (ratelimit passed it, or a bounce was made)
    REPLAYED = "replayed"  # an operator put parked mail back (`mailflow replay`): open again
    VALIDATED = "validated"  # the validator passed it on to scanning
    SCANNED = "scanned"  # the scanners passed it
    SENT_FOLDER = "sent_folder"  # the sender's Sent copy is stored, delivery is next
    DEFERRED = "deferred"  # a delivery attempt failed temporarily; waits on a retry tier
    HELD = "held"  # an operator's hold (`mailflow queue hold`)
    STORED = "stored"  # in a local mailbox
    DELIVERED = "delivered"  # the recipient's MX answered 250
    BOUNCED = "bounced"  # failed for good; a bounce report went to the sender
    REJECTED = "rejected"  # refused by the validator (or the sent-folder stage)
    QUARANTINED = "quarantined"  # the scanners found malware or spam
    RATE_LIMITED = "rate_limited"  # the sender was over its rate
    SUPPRESSED = "suppressed"  # the recipient is on the sender domain's suppression list


# The states a recipient ends in: the status stage keeps the first one it records.
FINAL: frozenset[State] = frozenset({
    State.STORED, State.DELIVERED, State.BOUNCED, State.REJECTED, State.QUARANTINED,
    State.RATE_LIMITED, State.SUPPRESSED,
})


def is_final(state: str) -> bool:
    """Whether `state` (a member or its string) is one a recipient ends in."""
    return state in FINAL
