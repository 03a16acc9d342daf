"""`mailflow up` and `mailflow down` as a new user meets them, on a real stack.

One `mailflow up` from a fresh data dir with a fresh broker (it starts its own on
free ports, so the broker's JVM is one of the processes it must take along),
scanners off to keep it cheap: it reaches ready, the README's quick start runs
against it as written, a second `mailflow up` beside it refuses and names it, a
SIGKILL of it leaves no process of the stack behind; then a `mailflow up` after that
crash starts cleanly, and the README's `mailflow down` stops it in the foreground.
The tests run in this order and share the stack (module fixture).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import ROOT, free_port, wait_for

READY = "stack ready"


def _free_pair() -> int:
    import socket

    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports")


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the name, or None if gone or a zombie (dead)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields


def _tree(root: int) -> dict[int, tuple[int, str]]:
    """`root` and every descendant: pid -> (start time, command line)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (f := _stat(int(entry.name))):
            parents[int(entry.name)] = int(f[1])
    found = {root}
    while True:
        more = {p for p, pp in parents.items() if pp in found and p not in found}
        if not more:
            break
        found |= more
    out = {}
    for pid in found:
        f = _stat(pid)
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f:
            out[pid] = (int(f[19]), cmd.strip())
    return out


def _survivors(tree: dict[int, tuple[int, str]]) -> list[str]:
    return [f"{pid} {cmd[:80]}" for pid, (start, cmd) in tree.items()
            if (f := _stat(pid)) and int(f[19]) == start]


class Up:
    """One `mailflow up` in the foreground, as `make run` starts it."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "mailflow.ops.cli", "up", "--no-scanners"],
                                         env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"mailflow up exited {self.proc.returncode}:\n{self.output()[-3000:]}"
            return READY in self.output()
        wait_for(ready, timeout, interval=0.5, what="mailflow up to be ready")


def _mailflow(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailflow.ops.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _quick_start() -> list[str]:
    """The ```sh blocks of the README's "Quick start" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def _run_blocks(blocks: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The blocks as one shell session (their variables carry over, as in a terminal),
    failing on the first command that fails."""
    script = "set -euo pipefail\n" + "\n".join(blocks)
    return subprocess.run(["bash", "-c", script], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("up")
    kafka = _free_pair()
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAILFLOW_API", "MAILFLOW_API_KEY", "MAILFLOW_TOKEN", "MAILFLOW_AUTH")}
    env.update({
        "PYTHONPATH": str(ROOT),
        "MAILFLOW_KAFKA_BOOTSTRAP": f"127.0.0.1:{kafka}",  # nothing there: up starts a broker
        "MAILFLOW_DATA_DIR": str(base / "var"),
        "MAILFLOW_TOPIC_PREFIX": f"up{uuid.uuid4().hex[:6]}.",
        "MAILFLOW_API_PORT": str(free_port()),
        "MAILFLOW_LAG_PORT": str(free_port()),
        "MAILFLOW_SCANNERS": "none",
        "MAILFLOW_SMTP_ROUTES": f"*=127.0.0.1:{free_port()}",
        "MAILFLOW_PARTITIONS": "2",
        "MAILFLOW_LOCAL_DOMAINS": "mailflow.local",
    })
    # The README's commands call .venv/bin/mailflow from the repository: a directory
    # where .venv is this interpreter's environment stands in for it.
    shell = base / "shell"
    shell.mkdir()
    (shell / ".venv").symlink_to(Path(sys.prefix))
    state: dict[str, Any] = {"env": env, "shell": shell, "base": base, "ups": []}
    up = Up(env, base / "up.log")
    state["ups"].append(up)
    try:
        up.wait_ready()
        state["tree"] = _tree(up.proc.pid)
        yield state
    finally:
        for u in state["ups"]:
            for pid in _tree(u.proc.pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            u.proc.wait(30)


def test_up_reaches_ready_and_the_readme_quick_start_works(first: dict[str, Any]) -> None:
    up: Up = first["ups"][0]
    out = up.output()
    assert "export MAILFLOW_API_KEY=mf_" in out and "export MAILFLOW_TOKEN=mft_" in out
    blocks = _quick_start()
    assert len(blocks) == 3 and blocks[-1].strip() == ".venv/bin/mailflow down"
    done = _run_blocks(blocks[:-1], first["env"], first["shell"])
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert re.search(r"demo@mailflow\.local\s+stored", done.stdout), done.stdout
    assert '"subject":"hi"' in done.stdout  # demo@'s mailbox, read with the token
    assert re.search(r"^ratelimit\s+\S+ratelimit\s", done.stdout, re.M), done.stdout  # mailflow lag
    sink = Path(first["env"]["MAILFLOW_DATA_DIR"]) / "sink"
    wait_for(lambda: any(p.read_bytes().find(b"to the sink") >= 0 for p in sink.glob("*.eml")),
             90, what="the message to carol@example.com in the sink")


def test_a_second_up_refuses_and_names_the_first(first: dict[str, Any]) -> None:
    up: Up = first["ups"][0]
    env = first["env"]
    started = time.monotonic()
    for args in (["up", "--no-scanners"], ["up", "--detach", "--no-scanners"]):
        again = _mailflow(env, *args, timeout=60)
        assert again.returncode != 0
        assert f"pid {up.proc.pid}" in again.stderr, again.stderr
        assert f"http://127.0.0.1:{env['MAILFLOW_API_PORT']}" in again.stderr
        assert env["MAILFLOW_DATA_DIR"] in again.stderr
    # Another data dir, but the same ports: refused too, naming the port.
    other = _mailflow({**env, "MAILFLOW_DATA_DIR": str(first["base"] / "other")}, "up",
                      "--no-scanners", timeout=60)
    assert other.returncode != 0
    assert f"API port {env['MAILFLOW_API_PORT']}" in other.stderr, other.stderr
    assert time.monotonic() - started < 30  # "at once": nothing was started
    assert up.proc.poll() is None  # the first one is untouched
    assert _mailflow(env, "env").stdout.startswith(f"export MAILFLOW_API=http://127.0.0.1:{env['MAILFLOW_API_PORT']}")


def test_sigkill_of_up_leaves_no_process_behind(first: dict[str, Any]) -> None:
    up: Up = first["ups"][0]
    tree = _tree(up.proc.pid)
    cmds = " ".join(cmd for _, cmd in tree.values())
    # What `mailflow up` started: the broker and its JVM, every stage, the API, ...
    assert "kafka.Kafka" in cmds and "mailflow.ops.cli api" in cmds and "--stages deliver" in cmds
    assert len(tree) >= 12, cmds
    os.kill(up.proc.pid, signal.SIGKILL)
    up.proc.wait(10)
    deadline = time.monotonic() + 10
    while _survivors(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _survivors(tree), f"still running 10 s after the SIGKILL: {_survivors(tree)}"


def test_up_after_a_sigkill_starts_cleanly_and_down_stops_it(first: dict[str, Any]) -> None:
    env = first["env"]
    assert first["ups"][0].proc.poll() is not None  # killed by the test before
    up = Up(env, first["base"] / "up2.log")
    first["ups"].append(up)
    up.wait_ready()
    assert "already running" not in up.output()
    tree = _tree(up.proc.pid)
    assert any("kafka.Kafka" in cmd for _, cmd in tree.values())
    # The README's last quick-start block: a foreground stack stopped from another shell.
    down = _run_blocks(_quick_start()[-1:], env, first["shell"])
    assert down.returncode == 0, f"{down.stdout}\n{down.stderr}"
    assert "stack stopped" in down.stdout
    assert up.proc.wait(30) == 0  # a clean stop, as Ctrl-C
    assert not _survivors(tree), _survivors(tree)
    assert "no stack is running" in _mailflow(env, "down").stdout


def test_a_detached_stack_keeps_its_secrets_out_of_its_log(first: dict[str, Any]) -> None:
    """`mailflow up --detach` prints the demo key and token to the terminal that ran
    it; the background stack's log (DATA_DIR/run/up.log) never holds them."""
    env = first["env"]
    assert "no stack is running" in _mailflow(env, "down").stdout  # the test before stopped it
    up = _mailflow(env, "up", "--detach", "--no-scanners", timeout=420)
    try:
        assert up.returncode == 0, f"{up.stdout}\n{up.stderr}"
        saved = json.loads((Path(env["MAILFLOW_DATA_DIR"]) / "demo-credentials.json").read_text())
        assert saved["key"] in up.stderr and saved["token"] in up.stderr  # the terminal has them
        log = (Path(env["MAILFLOW_DATA_DIR"]) / "run" / "up.log").read_text(errors="replace")
        assert "stack ready" in log
        assert saved["key"] not in log and saved["token"] not in log, "a secret in the stack's log"
        assert "`mailflow env` prints them" in log
    finally:
        down = _mailflow(env, "down")
    assert down.returncode == 0 and "stack stopped" in down.stdout, f"{down.stdout}\n{down.stderr}"
