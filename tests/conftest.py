"""Session fixtures: one real Kafka broker for the whole run."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The harness is imported by name (`from harness import ...`) without putting
# tests/ on sys.path, where tests/mailflow would shadow the real package.
_spec = importlib.util.spec_from_file_location("harness", Path(__file__).with_name("harness.py"))
assert _spec and _spec.loader
harness = importlib.util.module_from_spec(_spec)
sys.modules["harness"] = harness
_spec.loader.exec_module(harness)
BOOTSTRAP, Broker, Stack = harness.BOOTSTRAP, harness.Broker, harness.Stack
# The test CA and TLS peers (tests/testca.py), imported by name the same way.
_spec = importlib.util.spec_from_file_location("testca", Path(__file__).with_name("testca.py"))
assert _spec and _spec.loader
sys.modules["testca"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sys.modules["testca"])


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's broker: reused if one answers already, else started here."""
    from devtools.broker import is_ready

    if is_ready(BOOTSTRAP):
        yield BOOTSTRAP
        return
    host, _, port = BOOTSTRAP.rpartition(":")
    broker = Broker(tmp_path_factory.mktemp("kafka"), int(port), int(port) + 1)
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stacks")


@pytest.fixture(scope="session")
def submission_stack(kafka: str, work_dir: Path) -> Iterator[Stack]:
    """The submission half: ratelimit, validate, store, status (no scanner)."""
    stack = Stack(work_dir, kafka, rate_limit="20/1h")
    try:
        yield stack.start(["ratelimit", "validate", "store", "status"])
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def scanners(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Real clamd, rspamd and the loopback DNS server (reused if already running)."""
    from devtools.services import check_installed, ensure_running

    missing = check_installed()
    assert not missing, f"scanner daemons missing (make setup installs them): {missing}"
    group = ensure_running(tmp_path_factory.mktemp("services"), log=lambda m: print(m, file=sys.stderr))
    try:
        yield
    finally:
        if group is not None:
            group.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that ran a stack gets the tail of each of its processes' logs in
    its report: CI keeps no temporary directories, and a stall is read from them."""
    report = yield
    if report.failed and call.when == "call":
        funcargs = getattr(item, "funcargs", {})
        for stack in {id(v): v for v in funcargs.values() if isinstance(v, Stack)}.values():
            for log in sorted((stack.data_dir / "logs").glob("*.log")):
                lines = log.read_text(errors="replace").splitlines()[-60:]
                report.sections.append((f"{stack.prefix} {log.name} (last 60 lines)", "\n".join(lines)))
    return report
