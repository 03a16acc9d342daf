"""A small process supervisor for the local stack.

Children start in order, each optionally waited on until ready; a child that dies
is restarted with backoff (if asked); SIGINT/SIGTERM/SIGHUP stop them all in
reverse order, SIGTERM first and SIGKILL after a grace period, whole process
groups so no grandchild (a JVM, rspamd's workers) is left behind.

A supervisor that dies without stopping them (SIGKILL, a crash) takes them along
all the same: each child is started with a parent-death signal (`die_with_parent`,
Linux's ``PR_SET_PDEATHSIG``), which the kernel sends it when the supervisor ends,
and every level that starts children of its own (`mailflow broker`'s JVM, the
daemons of `devtools.services`) does the same.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_prctl: Callable[..., int] | None = None


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for `subprocess.Popen`: the child gets `sig` when the process
    starting it ends, however it ends (SIGKILL included). None off Linux.

    The kernel ties the signal to the *thread* that forks, so start children from a
    thread that lives as long as they should (the main thread here). A parent that
    died between fork and prctl would never send it: the child checks and signals
    itself. ``prctl`` is looked up here, in the parent, so the child only calls it.
    """
    global _prctl
    if not sys.platform.startswith("linux"):
        return None
    if _prctl is None:
        import ctypes

        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl, parent = _prctl, os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


@dataclass
class Child:
    name: str
    argv: list[str]
    restart: bool = False
    ready: Callable[[], bool] | None = None
    env: dict[str, str] | None = None
    # What the child gets if the supervisor dies without stopping it: SIGTERM (a
    # clean stop) for children that stop their own children, SIGKILL for those built
    # to survive a crash (the stages), which must not wait on a broker going too.
    death_signal: int = signal.SIGTERM
    before: Callable[[], object] | None = None  # run once, just before the first start
    # Stopped only once every other child has stopped (the broker, the scanners, a
    # local SMTP sink): a stage stopping cleanly flushes and commits to the broker and
    # finishes its SMTP sessions, which a broker stopping at the same moment refuses.
    stops_last: bool = False
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)


class Supervisor:
    def __init__(self, log: Callable[[str], None] | None = None, grace: float = 20.0,
                 on_spawn: Callable[[Child], None] | None = None) -> None:
        self.children: list[Child] = []
        self.log = log or (lambda m: print(f"mailflow: {m}", file=sys.stderr, flush=True))
        self.grace = grace
        self.stopping = False
        self.on_spawn = on_spawn  # told of every start and restart (the stack's lock file)

    def add(self, name: str, argv: list[str], *, restart: bool = False,
            ready: Callable[[], bool] | None = None, env: dict[str, str] | None = None,
            death_signal: int = signal.SIGTERM, before: Callable[[], object] | None = None,
            stops_last: bool = False) -> None:
        self.children.append(Child(name, argv, restart, ready, env, death_signal, before,
                                   stops_last))

    def _spawn(self, c: Child) -> None:
        env = {**os.environ, **(c.env or {})}
        c.proc = subprocess.Popen(c.argv, env=env, start_new_session=True,
                                  preexec_fn=die_with_parent(c.death_signal))
        c.started_at = time.monotonic()
        if self.on_spawn:
            self.on_spawn(c)

    def install_signals(self) -> None:
        """SIGINT (Ctrl-C), SIGTERM (`mailflow down`) and SIGHUP (the terminal went
        away) all ask for the same clean stop; call before `start` so a signal during
        start-up stops what started too."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def start(self, ready_timeout: float = 180.0) -> None:
        for c in self.children:
            if self.stopping:
                raise RuntimeError("stopping")
            if c.before is not None:
                c.before()
            self._spawn(c)
            if c.ready is None:
                continue
            deadline = time.monotonic() + ready_timeout
            while not c.ready():
                if c.proc and c.proc.poll() is not None:
                    raise RuntimeError(f"{c.name} exited with {c.proc.returncode} before it was ready")
                if self.stopping:
                    raise RuntimeError(f"stopped while {c.name} was starting")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{c.name} not ready after {ready_timeout:.0f}s")
                time.sleep(0.2)
            self.log(f"{c.name} ready")

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def run_forever(self) -> int:
        self.install_signals()
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
        """SIGTERM to every child, then SIGKILL to those still running after `grace`
        seconds; the children that stop last (`stops_last`) only once the others
        have stopped, with a grace of their own."""
        self.stopping = True
        for wave in ([c for c in self.children if not c.stops_last],
                     [c for c in self.children if c.stops_last]):
            self._stop_all(wave)

    def _stop_all(self, children: list[Child]) -> None:
        for c in reversed(children):
            if c.proc and c.proc.poll() is None:
                _signal_group(c.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for c in reversed(children):
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
