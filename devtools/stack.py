"""`mailflow up` / `mailflow down`: the whole local stack under one supervisor.

Order: Kafka broker (unless one already answers at ``KAFKA_BOOTSTRAP``; with
``BROKER_NODES`` > 1 each node of the local cluster, restarted if it dies), clamd,
rspamd and the loopback DNS server, the SMTP sink (when a route points at it),
one process per stage, then the HTTP API. Each is waited on until it is ready.
Ctrl-C, SIGTERM, SIGHUP or `mailflow down` stops them in reverse order, flushing
and committing; if `mailflow up` itself dies (SIGKILL included), every child goes
with it (`mailflow.ops.supervise.die_with_parent`).

One stack per data dir: the running `mailflow up` holds an flock on
``DATA_DIR/run/up.lock`` for its whole life (the kernel drops it when the process
ends, however it ends), with its pid, API URL and children written in the file.
A second `mailflow up` on that data dir refuses and names the first; `mailflow down`
finds the stack there whether it runs in the foreground or detached; a `mailflow up`
after a crash takes the lock over and first stops what the dead stack's children
left behind, if anything.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from mailflow.config import Settings
from mailflow.ops.supervise import Child, Supervisor
from streams.app import STAGES


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except Exception:
        return False


def _port_open(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


# ---- one stack per data dir ---------------------------------------------------------
def lock_path(settings: Settings) -> Path:
    return settings.data_dir / "run" / "up.lock"


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), or None
    if the process is gone or a zombie (dead, waiting to be reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields


def _proc_start(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot), or None if it is gone;
    with the pid it names one process, never a later one that reused the pid."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def _proc_pgid(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[2]) if fields else None


class StackLock:
    """``DATA_DIR/run/up.lock``: flock'd (exclusive) by the `mailflow up` that runs the
    stack, holding a JSON record of it (pid, API URL, data dir, lag port, children).

    The lock, not the record, says whether a stack runs: the kernel releases it when
    the holder ends, however it ends, so a record left by a crash is stale the moment
    the lock can be taken. The file is never deleted (a process that opened it before
    the unlink would lock an orphaned inode), only emptied on a clean stop.
    """

    def __init__(self, settings: Settings) -> None:
        self.path = lock_path(settings)
        self._fd: int | None = None

    def acquire(self, attempts: int = 5) -> bool:
        """Take the lock (kept until `release` or the process ends); False if another
        process holds it. A `running` probe holds it for an instant: tried again."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        for i in range(attempts):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return True
            except BlockingIOError:
                if i + 1 < attempts:
                    time.sleep(0.1)
        os.close(fd)
        return False

    def read(self) -> dict[str, Any]:
        """The record in the file (that of a dead stack too); {} if none."""
        try:
            text = self.path.read_text()
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}

    def write(self, info: dict[str, Any]) -> None:
        assert self._fd is not None, "write needs the lock"
        data = json.dumps(info, indent=1).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def running(settings: Settings) -> dict[str, Any] | None:
    """The record of the stack running on this data dir, or None if none runs."""
    path = lock_path(settings)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            lock = StackLock(settings)
            deadline = time.monotonic() + 2.0
            info = lock.read()
            while not info and time.monotonic() < deadline:  # written just after locking
                time.sleep(0.05)
                info = lock.read()
            return info or {"pid": None, "data_dir": str(settings.data_dir)}
        return None
    finally:
        os.close(fd)


def describe(info: dict[str, Any]) -> str:
    return (f"pid {info.get('pid') or '?'}, API {info.get('api') or '?'}, "
            f"data dir {info.get('data_dir') or '?'}")


def reap_leftovers(info: dict[str, Any], timeout: float = 10.0,
                   log: Any = None) -> list[int]:
    """Stop what a dead stack's children left running (their process groups); return
    the pids signalled. Normally nothing: each child died with its parent. A group is
    only touched while its leader is the very process recorded (same start time), or,
    with the leader gone, for members started after it (forked by it)."""
    groups = {int(c["pid"]): int(c["start"]) for c in info.get("children", [])
              if c.get("pid") and c.get("start") is not None}
    if not groups:
        return []
    victims: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        pgid, start = _proc_pgid(pid), _proc_start(pid)
        if pgid in groups and start is not None and start >= groups[pgid] and pid != os.getpid():
            victims.append(pid)
    if not victims:
        return []
    if log:
        log(f"stopping {len(victims)} process(es) a stack that died left behind: "
            f"{', '.join(map(str, sorted(victims)))}")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in victims:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(_proc_start(p) is not None for p in victims):
            time.sleep(0.1)
    return victims


def _say(msg: str) -> None:
    print(f"mailflow: {msg}", file=sys.stderr, flush=True)


def _busy_ports(settings: Settings) -> list[str]:
    """Ports this stack would listen on that something else already holds."""
    busy = []
    if _port_open(settings.api_host if settings.api_host not in ("0.0.0.0", "::", "") else "127.0.0.1",
                  settings.api_port):
        api = f"http://{settings.api_host}:{settings.api_port}"
        what = "a mailflow API answers there" if _http_ok(f"{api}/healthz") else "in use"
        busy.append(f"API port {settings.api_port} ({what})")
    if _port_open("127.0.0.1", settings.lag_port):
        busy.append(f"lag exporter port {settings.lag_port} (MAILFLOW_LAG_PORT; in use)")
    return busy


# ---- the stack -----------------------------------------------------------------------
def build(settings: Settings, scanners: bool = True,
          on_spawn: Any = None) -> Supervisor:
    from devtools import broker
    from mailflow.ops.worker import available
    from streams.topics import ensure_topics

    me = [sys.executable, "-m", "mailflow.ops.cli"]
    sup = Supervisor(on_spawn=on_spawn)
    if settings.broker_nodes > 1:
        broker.supervise_cluster(sup, me, settings.kafka_bootstrap, settings.broker_nodes)
    elif not broker.is_ready(settings.kafka_bootstrap):
        _host, _, kafka_port = settings.kafka_bootstrap.rpartition(":")
        sup.add("kafka broker", [*me, "broker", "--port", kafka_port,
                                 "--controller-port", str(int(kafka_port) + 1)],
                ready=lambda: broker.is_ready(settings.kafka_bootstrap), stops_last=True)
    if scanners and available("scan"):
        def scanners_ready() -> bool:
            return _port_open("127.0.0.1", 3310) and _port_open("127.0.0.1", 11333)

        if not scanners_ready():
            sup.add("clamd, rspamd, dns", [sys.executable, "-m", "devtools.services", "up",
                                           "--dir", str(settings.data_dir / "services")],
                    ready=scanners_ready, stops_last=True)
    # The stages below are crash-safe by design (at-least-once, idempotent): if this
    # process dies they are killed outright, not left to a clean stop that could wait
    # on a broker that is stopping at the same moment.
    kill = signal.SIGKILL
    sink_routes = [(h, p) for h, p in settings.smtp_routes.values() if h in ("127.0.0.1", "localhost")]
    for host, port in sorted(set(sink_routes)):
        if not _port_open(host, port):
            sup.add(f"smtp sink :{port}", [*me, "sink", "--host", host, "--port", str(port)],
                    restart=True, ready=functools.partial(_port_open, host, port), death_signal=kill,
                    stops_last=True)
    first = True
    for stage in STAGES:
        if available(stage):
            # Topics created, and each partition served by its leader, before any stage
            # or the API looks: a broker that has just become ready is not yet serving.
            sup.add(f"stage {stage}", [*me, "worker", "--stages", stage], restart=True,
                    death_signal=kill, before=(lambda: ensure_topics(settings, 120.0)) if first else None)
            first = False
    sup.add("lag exporter", [*me, "lag", "--serve", str(settings.lag_port)], restart=True,
            death_signal=kill)
    api = f"http://{settings.api_host}:{settings.api_port}"
    sup.add("api", [*me, "api"], restart=True, ready=lambda: _http_ok(f"{api}/healthz"),
            death_signal=kill)
    return sup


# Set in the environment of the stack `mailflow up --detach` runs in the background.
DETACHED_CHILD = "MAILFLOW_UP_DETACHED_CHILD"


def api_url(settings: Settings) -> str:
    return f"http://{settings.api_host}:{settings.api_port}"


def env_lines(settings: Settings, key: str, token: str) -> list[str]:
    """Shell lines that give a second terminal what the README's examples use."""
    return [f"export MAILFLOW_API={api_url(settings)}",
            f"export MAILFLOW_API_KEY={key}",
            f"export MAILFLOW_TOKEN={token}"]


def print_demo_credentials(settings: Settings) -> None:
    """A ready demo key and mailbox token, so the first send works at once, printed
    as the export lines the README's quick start uses (also `mailflow env`)."""
    from mailflow.api.auth import auth_mode, ensure_demo_credentials

    if auth_mode() != "required":
        return
    key, token = ensure_demo_credentials(settings)
    if os.environ.get(DETACHED_CHILD):
        # Our output is the detached stack's log file: secrets never go in a log.
        # `mailflow up --detach` prints them to its own terminal once the stack is up.
        print("mailflow: demo credentials made; `mailflow env` prints them", file=sys.stderr, flush=True)
        return
    first = sorted(settings.local_domains)[0]
    lines = "\n".join(f"    {line}" for line in env_lines(settings, key, token))
    print(f"mailflow: demo API key (sends as {', '.join(sorted(settings.local_domains))}) and "
          f"mailbox token for demo@{first} (webmail at {api_url(settings)}/); in another "
          f"shell run `eval \"$(.venv/bin/mailflow env)\"`, or paste:\n{lines}\n"
          f"mailflow: then try: .venv/bin/mailflow send --from demo@{first} "
          f"--to someone@example.com --text hi", file=sys.stderr, flush=True)


def ensure_domain_keys(settings: Settings) -> None:
    """DKIM keys for the local domains (mailflow.mta.domains), so the demo signs its first message."""
    from mailflow.mta import domains

    try:
        made = domains.ensure(settings, sorted(settings.local_domains))
    except (domains.DomainError, RuntimeError) as exc:
        print(f"mailflow: no DKIM keys made for the local domains: {exc}", file=sys.stderr, flush=True)
        return
    for d in made:
        print(f"mailflow: made DKIM keys for {d}; `mailflow domains dns {d}` prints its DNS records",
              file=sys.stderr, flush=True)


def print_env(settings: Settings) -> int:
    """`mailflow env`: the export lines for the stack on this data dir (its API URL
    and demo credentials), for ``eval "$(mailflow env)"``."""
    path = settings.data_dir / "demo-credentials.json"
    info = running(settings)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        print(f"mailflow: no demo credentials in {path}; start the stack with `mailflow up`",
              file=sys.stderr)
        return 1
    if info is None:
        print(f"mailflow: note: no stack is running on {settings.data_dir}", file=sys.stderr)
    elif info.get("api"):
        settings = _with_api(settings, str(info["api"]))
    print("\n".join(env_lines(settings, saved["key"], saved["token"])))
    return 0


def _with_api(settings: Settings, api: str) -> Settings:
    import dataclasses

    host, _, port = api.removeprefix("http://").rpartition(":")
    return dataclasses.replace(settings, api_host=host, api_port=int(port))


def up(settings: Settings, detach: bool = False, scanners: bool = True) -> int:
    """`mailflow up`: 0 after a clean stop, 1 if it failed or refused to start."""
    other = running(settings)
    if other is not None:
        _say(f"a stack is already running on this data dir ({describe(other)}); "
             "stop it with `mailflow down`")
        return 1
    busy = _busy_ports(settings)
    if busy:
        _say(f"not starting: {'; '.join(busy)}. Another stack (on another data dir?) or "
             "another program holds them; stop it or pick other ports (MAILFLOW_API_PORT, "
             "MAILFLOW_LAG_PORT)")
        return 1
    if detach:
        return _up_detached(settings, scanners)
    lock = StackLock(settings)
    if not lock.acquire():
        _say(f"a stack is already running on this data dir ({describe(lock.read())}); "
             "stop it with `mailflow down`")
        return 1
    try:
        reap_leftovers(lock.read(), log=_say)
        info: dict[str, Any] = {"pid": os.getpid(), "api": api_url(settings),
                                "data_dir": str(settings.data_dir), "lag_port": settings.lag_port,
                                "kafka": settings.kafka_bootstrap, "started": time.time(),
                                "children": []}

        def record(c: Child) -> None:
            assert c.proc is not None
            kids = [k for k in info["children"] if k["name"] != c.name]
            info["children"] = [*kids, {"name": c.name, "pid": c.proc.pid,
                                        "start": _proc_start(c.proc.pid)}]
            lock.write(info)

        def ready() -> None:  # what `mailflow up --detach` waits for
            info["ready"] = True
            lock.write(info)

        lock.write(info)
        return _run(settings, build(settings, scanners, on_spawn=record), ready)
    finally:
        lock.release()


def _run(settings: Settings, sup: Supervisor, on_ready: Any = None) -> int:
    """Start, print the credentials, supervise; whatever ends it, stop every child."""
    from mailflow.kafka_ready import BrokerNotReady

    sup.install_signals()
    since = time.time()
    try:
        sup.start()
        ensure_domain_keys(settings)
        wait_stages(settings, sup, since)
        print_demo_credentials(settings)
        if on_ready:
            on_ready()
        _say(f"stack ready; API {api_url(settings)} (Ctrl-C or `mailflow down` stops it)")
        return sup.run_forever()
    except (RuntimeError, BrokerNotReady) as exc:  # BrokerNotReady is a RuntimeError too
        _say(f"{exc}; stopping the stack")
        return 1
    except Exception as exc:  # a Kafka or OS error: say what, stop all the same
        _say(f"{type(exc).__name__}: {exc}; stopping the stack")
        return 1
    finally:
        sup.stop()


def wait_stages(settings: Settings, sup: Supervisor, since: float, timeout: float = 240.0) -> None:
    """Until every stage the supervisor started has said on ``registry`` that it is
    consuming (a heartbeat newer than `since`: one of a previous run does not count),
    so that "stack ready" means a status or mailbox read is answered. Children that die
    meanwhile are restarted as usual; RuntimeError after `timeout`, naming the stages."""
    from mailflow.kafka_io import CompactedReader
    from streams.topics import full_name

    stages = [c.name.removeprefix("stage ") for c in sup.children if c.name.startswith("stage ")]
    topic = full_name(settings, "registry")
    reader = CompactedReader(settings.kafka_bootstrap, [topic])
    deadline = time.monotonic() + timeout
    try:
        while True:
            live = {v.get("stage") for v in list(reader.values[topic].values())
                    if float(v.get("ts") or 0) >= since}
            missing = [st for st in stages if st not in live]
            if not missing:
                sup.log(f"stages consuming: {', '.join(stages)}")
                return
            if sup.stopping:
                raise RuntimeError("stopped while the stages were starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"stage(s) not consuming after {timeout:.0f}s: {', '.join(missing)}")
            sup.check()
            time.sleep(0.5)
    finally:
        reader.close()


def _up_detached(settings: Settings, scanners: bool) -> int:
    log = settings.data_dir / "run" / "up.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # Its own session, no death signal: a detached stack outlives this command.
        proc = subprocess.Popen([sys.executable, "-m", "mailflow.ops.cli", "up"]
                                + ([] if scanners else ["--no-scanners"]),
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                env={**os.environ, DETACHED_CHILD: "1"},
                                start_new_session=True)
    deadline = time.monotonic() + 420
    while not (running(settings) or {}).get("ready"):
        if proc.poll() is not None or time.monotonic() > deadline:
            _say(f"the stack did not come up; see {log}")
            return 1
        time.sleep(0.5)
    print(f"mailflow: stack running (pid {proc.pid}); API {api_url(settings)}; "
          f"log {log}; stop with `mailflow down`")
    print_demo_credentials(settings)
    return 0


def down(settings: Settings, timeout: float = 60.0) -> int:
    """`mailflow down`: stop the stack running on this data dir (foreground or
    detached) and wait until it has stopped; 0 also when none was running."""
    info = running(settings)
    if info is None:
        print(f"mailflow: no stack is running on {settings.data_dir}")
        return 0
    pid = info.get("pid")
    if not pid:
        _say(f"a stack holds {lock_path(settings)} but its record is empty; not signalling it")
        return 1
    try:
        os.kill(int(pid), signal.SIGTERM)
    except ProcessLookupError:
        return 0
    deadline = time.monotonic() + timeout
    while running(settings) is not None:
        if time.monotonic() > deadline:
            # Its children follow it (death signal); they were told to stop already.
            _say(f"stack (pid {pid}) did not stop in {timeout:.0f}s; killing it")
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
            return 1
        time.sleep(0.3)
    # The lock goes once every child has stopped; the process itself a moment later.
    gone_by = time.monotonic() + 5
    while _proc_start(int(pid)) is not None and time.monotonic() < gone_by:
        time.sleep(0.1)
    print(f"mailflow: stack stopped ({describe(info)})")
    return 0
