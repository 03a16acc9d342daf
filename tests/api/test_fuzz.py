"""Schemathesis against the live API's /openapi.json: no 5xx, answers match the schema.

About 2,000 generated requests (positive and negative) over every operation, with
the stack's admin key; kept under ~2 minutes. ``MAILFLOW_FUZZ_EXAMPLES`` changes the
number per operation and mode.
"""

from __future__ import annotations

import os

import orjson
import pytest
from harness import Stack, http

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode  # noqa: E402

EXAMPLES = int(os.environ.get("MAILFLOW_FUZZ_EXAMPLES", "150"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def fuzz_operation(op, mode, headers: dict[str, str], accepted: set[str]) -> int:  # noqa: ANN001
    """Run EXAMPLES generated cases against one operation; the number run.

    Ids of submissions answered 202 are added to `accepted`.
    """
    seen: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case) -> None:  # noqa: ANN001
        if not any(k.lower() == "authorization" for k in (case.headers or {})):
            case.headers = {**(case.headers or {}), **headers}
        resp = case.call_and_validate(checks=CHECKS, timeout=30)
        seen.append(resp.status_code)
        if resp.status_code == 202 and case.method.upper() == "POST":
            accepted.add(resp.json()["id"])

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
        return 0
    except Exception as exc:  # name the operation in the failure
        raise AssertionError(f"{op.label} ({mode.value}): {exc}") from exc
    return len(seen)


def test_openapi_fuzz(submission_stack: Stack) -> None:
    s = submission_stack
    code, doc, _ = http("GET", f"{s.api}/openapi.json")
    assert code == 200
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.update(base_url=s.api)
    headers = {"Authorization": f"Bearer {s.key}"}
    before = {orjson.loads(v)["id"] for _, v in s.read_topic("submissions")}
    accepted: set[str] = set()
    total = 0
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            seen = fuzz_operation(op, mode, headers, accepted)
            total += seen
    assert total >= 10 * EXAMPLES, total  # some operations have few distinct inputs
    # Afterwards the pipeline holds exactly what was accepted: every 202 is on
    # `submissions` (idempotent repeats share an id), and nothing else was added.
    after = {orjson.loads(v)["id"] for _, v in s.read_topic("submissions")}
    assert after - before == accepted - before
