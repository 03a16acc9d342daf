"""Prometheus metrics, defined once for the API and every stage.

Labels stay bounded: stage, outcome, reply class, tier; never a recipient or id.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

STAGE_MESSAGES = Counter(
    "mailflow_stage_messages_total", "Records handled by a stage, by outcome",
    ["stage", "outcome"],
)
STAGE_SECONDS = Histogram(
    "mailflow_stage_processing_seconds", "Time a stage spends on one record", ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
END_TO_END_SECONDS = Histogram(
    "mailflow_final_state_seconds", "From acceptance to a recipient's final state", ["state"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400),
)
API_REQUESTS = Counter(
    "mailflow_api_requests_total", "HTTP API requests by route and status", ["route", "status"],
)
API_ACCEPTED = Counter("mailflow_api_accepted_total", "Messages acknowledged by Kafka and accepted")


def render() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
