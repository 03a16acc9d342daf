"""The supervisor's children die with it, and its signals are clean stops.

Real processes (a Python parent, `sleep` children); no Kafka.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from harness import ROOT, wait_for


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _parent(tmp_path: Path, body: str) -> subprocess.Popen[str]:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            start_new_session=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_child_dies_when_its_parent_is_killed(tmp_path: Path, sig: int) -> None:
    parent = _parent(tmp_path, f"""
        import subprocess, sys, time
        from mailflow.ops.supervise import die_with_parent
        child = subprocess.Popen(["sleep", "300"], start_new_session=True,
                                 preexec_fn=die_with_parent({int(sig)}))
        print(child.pid, flush=True)
        time.sleep(300)
    """)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()  # SIGKILL: no handler of the parent's runs
    parent.wait(10)
    wait_for(lambda: not _alive(child), 5, what=f"child {child} to die with its parent")


def test_supervisor_stops_children_cleanly_on_sighup(tmp_path: Path) -> None:
    """The terminal going away (SIGHUP) is the same clean stop as Ctrl-C: each child
    gets SIGTERM and its handler runs."""
    marker = tmp_path / "clean"
    child_code = (f"import signal, sys, time, pathlib\n"
                  f"def bye(*_): pathlib.Path({str(marker)!r}).write_text('clean'); sys.exit(0)\n"
                  f"signal.signal(signal.SIGTERM, bye)\n"
                  f"print('ready', flush=True)\n"
                  f"time.sleep(300)\n")
    parent = _parent(tmp_path, f"""
        import sys
        from mailflow.ops.supervise import Supervisor
        sup = Supervisor(grace=10)
        sup.add("child", [sys.executable, "-c", {child_code!r}])
        sup.install_signals()
        sup.start()
        print([c.proc.pid for c in sup.children][0], flush=True)
        sys.exit(sup.run_forever())
    """)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    time.sleep(0.5)  # the child's handler installed
    os.kill(parent.pid, signal.SIGHUP)
    assert parent.wait(20) == 0
    assert marker.read_text() == "clean"
    assert not _alive(child)


def test_stack_lock_is_released_when_its_holder_dies(tmp_path: Path) -> None:
    from devtools import stack
    from mailflow.config import Settings

    settings = Settings(data_dir=tmp_path)
    holder = _parent(tmp_path, f"""
        import subprocess, time
        from pathlib import Path
        from devtools import stack
        from mailflow.config import Settings
        lock = stack.StackLock(Settings(data_dir=Path({str(tmp_path)!r})))
        assert lock.acquire()
        kid = subprocess.Popen(["sleep", "300"], start_new_session=True)  # no death signal
        lock.write({{"pid": __import__("os").getpid(), "api": "http://127.0.0.1:1",
                    "data_dir": {str(tmp_path)!r},
                    "children": [{{"name": "sleep", "pid": kid.pid,
                                   "start": stack._proc_start(kid.pid)}}]}})
        print(kid.pid, flush=True)
        time.sleep(300)
    """)
    assert holder.stdout is not None
    orphan = int(holder.stdout.readline())
    info = stack.running(settings)
    assert info is not None and info["pid"] == holder.pid
    assert f"pid {holder.pid}" in stack.describe(info)
    mine = stack.StackLock(settings)
    assert not mine.acquire(attempts=1)  # held: a second stack may not start

    holder.kill()
    holder.wait(10)
    assert stack.running(settings) is None  # the kernel dropped the lock
    assert mine.acquire(attempts=1)
    try:
        # The dead stack's record still names its child, which had no death signal.
        assert _alive(orphan)
        assert stack.reap_leftovers(mine.read()) == [orphan]
        assert not _alive(orphan)
    finally:
        mine.release()
    assert stack.running(settings) is None


def test_the_broker_stops_only_once_the_stages_have_stopped(tmp_path: Path) -> None:
    """A child marked `stops_last` (the broker) gets its SIGTERM only after the
    others have exited: a stage's clean stop still has a broker to flush to."""
    def child(name: str, linger: float) -> str:
        return (f"import signal, sys, time, pathlib\n"
                f"def bye(*_):\n"
                f"    p = pathlib.Path({str(tmp_path)!r})\n"
                f"    (p / '{name}.term').write_text(repr(time.time()))\n"
                f"    time.sleep({linger})\n"
                f"    (p / '{name}.exit').write_text(repr(time.time()))\n"
                f"    sys.exit(0)\n"
                f"signal.signal(signal.SIGTERM, bye)\n"
                f"time.sleep(300)\n")
    parent = _parent(tmp_path, f"""
        import sys
        from mailflow.ops.supervise import Supervisor
        sup = Supervisor(grace=10)
        sup.add("broker", [sys.executable, "-c", {child("broker", 0)!r}], stops_last=True)
        sup.add("stage", [sys.executable, "-c", {child("stage", 1.0)!r}])
        sup.install_signals()
        sup.start()
        print("started", flush=True)
        sys.exit(sup.run_forever())
    """)
    assert parent.stdout is not None
    assert parent.stdout.readline().strip() == "started"
    time.sleep(0.5)  # the children's handlers installed
    os.kill(parent.pid, signal.SIGINT)
    assert parent.wait(30) == 0
    stage_exit = float((tmp_path / "stage.exit").read_text())
    broker_term = float((tmp_path / "broker.term").read_text())
    assert broker_term >= stage_exit
