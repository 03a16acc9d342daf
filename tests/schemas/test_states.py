"""schemas.states: every state the code puts on ``events`` is a `State`, and the
final ones are those the status stage, the API schema, the bench and the tests use."""

from __future__ import annotations

import ast
from pathlib import Path

from schemas.api import RECIPIENT_STATE
from schemas.states import FINAL, State, is_final

ROOT = Path(__file__).resolve().parents[2]
# Where events are made: the stages, their runtime, and the operator tools (replay).
SOURCES = [*ROOT.glob("agents/*.py"), *ROOT.glob("streams/*.py"), *ROOT.glob("mailflow/**/*.py")]


def _strings(node: ast.AST) -> list[str]:
    """The string constants `node` evaluates to: a literal, or either arm of `a if c else b`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    return []


def emitted_states() -> dict[str, list[str]]:
    """state -> where it is written, for every event the source code makes:
    ``io.event(id, "state", ...)`` (and any other call named ``event``),
    ``Event(..., state="...")``, and ``state = "..."`` assignments in those modules."""
    found: dict[str, list[str]] = {}
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            values: list[str] = []
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name == "event" and len(node.args) >= 2:
                    values += _strings(node.args[1])
                if name in ("event", "Event"):
                    values += [s for kw in node.keywords if kw.arg == "state" for s in _strings(kw.value)]
            elif isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "state" for t in node.targets):
                values += _strings(node.value)
            for v in values:
                found.setdefault(v, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_state_the_code_emits_is_declared() -> None:
    found = emitted_states()
    # The scan must see the stages' events, or it proves nothing.
    assert {"accepted", "validated", "delivered", "deferred", "bounced", "replayed"} <= set(found)
    unknown = {s: w for s, w in found.items() if s not in {m.value for m in State}}
    assert not unknown, f"states not in schemas.states.State: {unknown}"


def test_every_declared_state_is_emitted_somewhere() -> None:
    assert {m.value for m in State} <= set(emitted_states())


def test_final_states() -> None:
    assert {s.value for s in FINAL} == {"stored", "delivered", "bounced", "rejected", "quarantined",
                                        "rate_limited", "suppressed"}
    # Plain strings (as parsed from a record) are found in it.
    assert "delivered" in FINAL and is_final("bounced")
    assert not is_final("deferred") and not is_final("replayed") and not is_final("held")


def test_api_schema_lists_every_state() -> None:
    assert RECIPIENT_STATE["properties"]["state"]["enum"] == [s.value for s in State]
    assert "replayed" in RECIPIENT_STATE["properties"]["state"]["enum"]


def test_the_status_stage_the_bench_and_the_tests_share_final() -> None:
    import harness

    from agents import status
    from mailflow import webhooks

    assert status.FINAL is FINAL and harness.FINAL is FINAL and webhooks.FINAL is FINAL
