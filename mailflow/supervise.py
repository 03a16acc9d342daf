"""A small process supervisor for the local stack.

Children start in order, each optionally waited on until ready; a child that dies
is restarted with backoff (if asked); SIGINT/SIGTERM stop them all in reverse
order, SIGTERM first and SIGKILL after a grace period, whole process groups so
no grandchild (a JVM, rspamd's workers) is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Child:
    name: str
    argv: list[str]
    restart: bool = False
    ready: Callable[[], bool] | None = None
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)


class Supervisor:
    def __init__(self, log: Callable[[str], None] | None = None, grace: float = 20.0) -> None:
        self.children: list[Child] = []
        self.log = log or (lambda m: print(f"mailflow: {m}", file=sys.stderr, flush=True))
        self.grace = grace
        self.stopping = False

    def add(self, name: str, argv: list[str], *, restart: bool = False,
            ready: Callable[[], bool] | None = None, env: dict[str, str] | None = None) -> None:
        self.children.append(Child(name, argv, restart, ready, env))

    def _spawn(self, c: Child) -> None:
        env = {**os.environ, **(c.env or {})}
        c.proc = subprocess.Popen(c.argv, env=env, start_new_session=True)
        c.started_at = time.monotonic()

    def start(self, ready_timeout: float = 180.0) -> None:
        for c in self.children:
            self._spawn(c)
            if c.ready is None:
                continue
            deadline = time.monotonic() + ready_timeout
            while not c.ready():
                if c.proc and c.proc.poll() is not None:
                    raise RuntimeError(f"{c.name} exited with {c.proc.returncode} before it was ready")
                if time.monotonic() > deadline or self.stopping:
                    raise RuntimeError(f"{c.name} not ready after {ready_timeout:.0f}s")
                time.sleep(0.2)
            self.log(f"{c.name} ready")

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def run_forever(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            if not any(c.proc for c in self.children):
                self.start()
            while not self.stopping:
                self.check()
                time.sleep(0.5)
        except RuntimeError as exc:
            self.log(str(exc))
            self.stop()
            return 1
        self.stop()
        return 0

    def check(self) -> None:
        """Restart children that died (with backoff), or report them."""
        now = time.monotonic()
        for c in self.children:
            if c.proc is None or c.proc.poll() is None:
                if c.proc is None and now >= c.next_start:
                    self._spawn(c)
                continue
            code = c.proc.returncode
            if not c.restart:
                raise RuntimeError(f"{c.name} exited with {code}")
            c.restarts += 1
            delay = min(30.0, 2 ** min(c.restarts, 5)) if now - c.started_at < 60 else 1.0
            self.log(f"{c.name} exited with {code}; restarting in {delay:.0f}s")
            c.proc = None
            c.next_start = now + delay

    def stop(self) -> None:
        self.stopping = True
        for c in reversed(self.children):
            if c.proc and c.proc.poll() is None:
                _signal_group(c.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for c in reversed(self.children):
            if not c.proc:
                continue
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"{c.name} did not stop in {self.grace:.0f}s; killing it")
                _signal_group(c.proc, signal.SIGKILL)
                c.proc.wait()
            # A child's own children (a JVM under a shell, daemon workers) go too.
            _signal_group(c.proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
