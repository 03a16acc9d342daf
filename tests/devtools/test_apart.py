"""The development tools stay apart from the runtime: no stage, no part of the API,
and no command that runs them (`mailflow worker`, `mailflow api`) imports devtools."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: this test process has devtools imported already.
PROBE = """
import importlib, pkgutil, sys
import agents, mailflow.api
names = [f"agents.{m.name}" for m in pkgutil.iter_modules(agents.__path__)]
names += [f"mailflow.api.{m.name}" for m in pkgutil.iter_modules(mailflow.api.__path__)]
names += ["mailflow.ops.worker", "mailflow.ops.cli", "streams.app", "streams.topics"]
for name in names:
    importlib.import_module(name)
# The command line that starts a stage replica (the stage name is refused after parsing).
import mailflow.ops.cli
assert mailflow.ops.cli.main(["worker", "--stages", "no-such-stage"]) == 2
print(len(names))
print(",".join(sorted(m for m in sys.modules if m == "devtools" or m.startswith("devtools."))))
"""


def test_no_stage_nor_the_api_imports_devtools() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    count, imported = out.stdout.splitlines()[-2:]
    assert int(count) >= 15  # every stage module and the API's, or the check proves nothing
    assert imported == "", f"runtime modules imported {imported}"


def test_the_development_commands_reach_devtools() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for cmd in (["bench", "--help"], ["sink", "--help"], ["broker", "--help"], ["up", "--help"]):
        out = subprocess.run([sys.executable, "-m", "mailflow.ops.cli", *cmd], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "usage: mailflow" in out.stdout, (cmd, out.stderr)
    # bench's own options are there when asked for.
    out = subprocess.run([sys.executable, "-m", "mailflow.ops.cli", "bench", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert "--count" in out.stdout and "--concurrency" in out.stdout, out.stdout
