"""`mailflow up` / `mailflow down`: the whole local stack under one supervisor.

Order: Kafka broker (unless one already answers at ``KAFKA_BOOTSTRAP``; with
``BROKER_NODES`` > 1 each node of the local cluster, restarted if it dies), clamd,
rspamd and the loopback DNS server, the SMTP sink (when a route points at it),
one process per stage, then the HTTP API. Each is waited on until it is ready.
Ctrl-C (or `mailflow down` for ``--detach``) stops them in reverse order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mailflow.config import Settings
from mailflow.supervise import Supervisor
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


def pid_file(settings: Settings) -> Path:
    return settings.data_dir / "run" / "up.pid"


def build(settings: Settings, scanners: bool = True) -> Supervisor:
    from mailflow import broker
    from mailflow.worker import available

    me = [sys.executable, "-m", "mailflow.cli"]
    sup = Supervisor()
    if settings.broker_nodes > 1:
        broker.supervise_cluster(sup, me, settings.kafka_bootstrap, settings.broker_nodes)
    elif not broker.is_ready(settings.kafka_bootstrap):
        host, _, port = settings.kafka_bootstrap.rpartition(":")
        sup.add("kafka broker", [*me, "broker", "--port", port],
                ready=lambda: broker.is_ready(settings.kafka_bootstrap))
    if scanners and available("scan"):
        def scanners_ready() -> bool:
            return _port_open("127.0.0.1", 3310) and _port_open("127.0.0.1", 11333)

        if not scanners_ready():
            sup.add("clamd, rspamd, dns", [sys.executable, "-m", "mailflow.services", "up",
                                           "--dir", str(settings.data_dir / "services")],
                    ready=scanners_ready)
    sink_routes = [(h, p) for h, p in settings.smtp_routes.values() if h in ("127.0.0.1", "localhost")]
    for host, port in sorted(set(sink_routes)):
        if not _port_open(host, port):
            sup.add(f"smtp sink :{port}", [*me, "sink", "--host", host, "--port", str(port)],
                    restart=True, ready=lambda h=host, p=port: _port_open(h, p))
    for stage in STAGES:
        if available(stage):
            sup.add(f"stage {stage}", [*me, "worker", "--stages", stage], restart=True)
    sup.add("lag exporter", [*me, "lag", "--serve", "9308"], restart=True)
    api = f"http://{settings.api_host}:{settings.api_port}"
    sup.add("api", [*me, "api"], restart=True, ready=lambda: _http_ok(f"{api}/healthz"))
    return sup


def print_demo_credentials(settings: Settings) -> None:
    """A ready demo key and mailbox token, so the first send works at once."""
    from mailflow.api.auth import auth_mode, ensure_demo_credentials

    if auth_mode() != "required":
        return
    key, token = ensure_demo_credentials(settings)
    first = sorted(settings.local_domains)[0]
    print(f"mailflow: demo API key (sends as {', '.join(sorted(settings.local_domains))}): {key}\n"
          f"mailflow: demo mailbox token for demo@{first} (webmail at "
          f"http://{settings.api_host}:{settings.api_port}/): {token}\n"
          f"mailflow: try: MAILFLOW_API_KEY={key} .venv/bin/mailflow send --from demo@{first} "
          f"--to someone@example.com --text hi", file=sys.stderr, flush=True)


def ensure_domain_keys(settings: Settings) -> None:
    """DKIM keys for the local domains (mailflow.domains), so the demo signs its first message."""
    from mailflow import domains

    try:
        made = domains.ensure(settings, sorted(settings.local_domains))
    except (domains.DomainError, RuntimeError) as exc:
        print(f"mailflow: no DKIM keys made for the local domains: {exc}", file=sys.stderr, flush=True)
        return
    for d in made:
        print(f"mailflow: made DKIM keys for {d}; `mailflow domains dns {d}` prints its DNS records",
              file=sys.stderr, flush=True)


def up(settings: Settings, detach: bool = False, scanners: bool = True) -> int:
    pf = pid_file(settings)
    pf.parent.mkdir(parents=True, exist_ok=True)
    if detach:
        log = settings.data_dir / "run" / "up.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "mailflow.cli", "up"]
                                    + ([] if scanners else ["--no-scanners"]),
                                    stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        api = f"http://{settings.api_host}:{settings.api_port}/healthz"
        deadline = time.monotonic() + 300
        while not _http_ok(api):
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"mailflow: the stack did not come up; see {log}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print(f"mailflow: stack running (pid {proc.pid}); API {api.removesuffix('/healthz')}; "
              f"log {log}; stop with `mailflow down`")
        print_demo_credentials(settings)
        return 0
    pf.write_text(str(os.getpid()))
    sup = build(settings, scanners)
    try:
        sup.start()
        ensure_domain_keys(settings)
        print_demo_credentials(settings)
        print(f"mailflow: stack ready; API http://{settings.api_host}:{settings.api_port} "
              f"(Ctrl-C stops it)", file=sys.stderr, flush=True)
        return sup.run_forever()
    except (RuntimeError, KeyboardInterrupt) as exc:
        print(f"mailflow: {exc or 'stopping'}", file=sys.stderr)
        sup.stop()
        return 1
    finally:
        pf.unlink(missing_ok=True)


def down(settings: Settings, timeout: float = 60.0) -> int:
    pf = pid_file(settings)
    if not pf.exists():
        print("mailflow: no stack started with `mailflow up --detach` is running")
        return 0
    pid = int(pf.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pf.unlink(missing_ok=True)
        return 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print("mailflow: stack stopped")
            return 0
        time.sleep(0.3)
    print(f"mailflow: stack (pid {pid}) did not stop in {timeout:.0f}s", file=sys.stderr)
    return 1
