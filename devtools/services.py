"""Local scanner services for development and tests: clamd, rspamd and dnsmasq.

Each daemon runs as a child process in its own foreground mode, bound to
loopback, with every config file, database, socket, pid file and log under a
data directory (default ``./var/services/<name>/``).  Nothing here uses
systemd, reads or writes the system's ``/etc`` configuration of the daemons
or touches their system instances; rspamd only *includes* Debian's stock
rules from ``/etc/rspamd`` read-only.  The one thing kept outside the data
dir is rspamd's compiled hyperscan cache (``~/.cache/mailflow/rspamd-hs``,
see ``prepare_rspamd``), which makes a fresh data dir start in ~1 s, not ~15 s.

* clamd on 127.0.0.1:3310 with a generated one-signature database that
  detects the EICAR test file (reported as ``Eicar-Test-Signature.UNOFFICIAL``),
  also inside mail (ScanMail) and archives (ScanArchive).  freshclam is never
  run.
* rspamd on 127.0.0.1:11333 (normal worker, ``/checkv2``) and 127.0.0.1:11334
  (controller) with the stock rules but offline: DNS goes only to the loopback
  dnsmasq and the modules that need the internet or redis are disabled.
* dnsmasq on 127.0.0.1:5353 (UDP and TCP), no upstream servers, records from
  a config snippet; every name it does not know is answered NXDOMAIN.

Readiness is probed (clamd ``PING``, rspamd ``GET /ping``, a DNS query), never
slept for.  Usage::

    python -m devtools.services check           # are the daemons installed?
    python -m devtools.services up [--dir D]    # run all three until Ctrl-C

or from Python::

    with ServiceGroup([prepare_dnsmasq(d / "dnsmasq"), prepare_clamd(d / "clamd"),
                       prepare_rspamd(d / "rspamd")]) as group:
        ...
"""

from __future__ import annotations

import argparse
import atexit
import base64
import errno
import grp
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

from mailflow.ops.supervise import die_with_parent

__all__ = [
    "CLAMD_PORT",
    "DEFAULT_DATA_DIR",
    "DEFAULT_DNS_CONF",
    "DNS_PORT",
    "EICAR",
    "EICAR_SIGNATURE",
    "RSPAMD_CONTROLLER_PORT",
    "RSPAMD_DISABLED_MODULES",
    "RSPAMD_PORT",
    "Service",
    "ServiceGroup",
    "check_installed",
    "clamd_ping",
    "default_cache_dir",
    "dns_ping",
    "dns_query",
    "ensure_running",
    "main",
    "prepare_all",
    "prepare_clamd",
    "prepare_dnsmasq",
    "prepare_rspamd",
    "rspamd_ping",
    "write_eicar_db",
]

DEFAULT_DATA_DIR = Path("var/services")
LOOPBACK = "127.0.0.1"
CLAMD_PORT = 3310
RSPAMD_PORT = 11333
RSPAMD_CONTROLLER_PORT = 11334
DNS_PORT = 5353

# Where the executables live on Debian; /usr/sbin is often not on a user's PATH.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
)
# executable -> Debian package that ships it
EXECUTABLES: dict[str, str] = {
    "clamd": "clamav-daemon",
    "sigtool": "clamav",
    "rspamd": "rspamd",
    "dnsmasq": "dnsmasq-base",
}

# The 68-byte EICAR anti-virus test file, kept base64-encoded so that this
# source file is not itself flagged by virus scanners.
EICAR = base64.b64decode(
    b"WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo="
)
# Name of our signature; clamd reports it with ".UNOFFICIAL" appended because
# the database is not signed by Cisco-Talos:  "stream: Eicar-Test-Signature.UNOFFICIAL FOUND".
EICAR_SIGNATURE = "Eicar-Test-Signature"

# Records every mailflow dnsmasq serves (``up`` and ``ensure_running`` use it),
# so that a dnsmasq started by one session is usable by another.
DEFAULT_DNS_CONF = """\
# mailflow test zone (all addresses are loopback or TEST-NET, RFC 5737)
host-record=mx1.example.test,127.0.0.1
host-record=mx2.example.test,127.0.0.2
mx-host=example.test,mx1.example.test,10
mx-host=example.test,mx2.example.test,20
host-record=a.mailflow.test,192.0.2.10
host-record=mx.mailflow.test,127.0.0.1
mx-host=mailflow.test,mx.mailflow.test,10
# RFC 7505 null MX: "this domain accepts no mail"
mx-host=nullmx.test,.,0
host-record=nullmx.test,192.0.2.99
# two MX of equal preference (RFC 5321 5.1: senders shuffle them)
host-record=mxa.equal.test,127.0.0.1
host-record=mxb.equal.test,127.0.0.2
mx-host=equal.test,mxa.equal.test,10
mx-host=equal.test,mxb.equal.test,10
# no MX, only an AAAA: the implicit MX over IPv6
host-record=v6.mailflow.test,::1
# IDN: xn--bcher-kva.test, the A-labels of "bucher.test" with a u-umlaut
host-record=mx.xn--bcher-kva.test,127.0.0.1
mx-host=xn--bcher-kva.test,mx.xn--bcher-kva.test,10
# exists (a TXT record) but has neither MX nor address: no mail destination
txt-record=nomail.test,"v=spf1 -all"
"""


# --------------------------------------------------------------------------- probes


def _tcp_exchange(host: str, port: int, payload: bytes, timeout: float, until: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(payload)
        buf = b""
        while until not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        return buf


def clamd_ping(host: str = LOOPBACK, port: int = CLAMD_PORT, timeout: float = 1.0) -> bool:
    """True if clamd answers ``PING`` with ``PONG`` (it binds only after loading the db)."""
    try:
        return _tcp_exchange(host, port, b"zPING\0", timeout, b"\0").rstrip(b"\0") == b"PONG"
    except OSError:
        return False


def rspamd_ping(host: str = LOOPBACK, port: int = RSPAMD_PORT, timeout: float = 1.0) -> bool:
    """True if an rspamd worker answers ``GET /ping`` with ``pong``."""
    req = f"GET /ping HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode()
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(req)
            buf = b""
            while chunk := s.recv(4096):
                buf += chunk
    except OSError:
        return False
    head, _, body = buf.partition(b"\r\n\r\n")
    return (
        head.startswith(b"HTTP/1.")
        and b" 200 " in head.split(b"\r\n", 1)[0]
        and body.strip() == b"pong"
    )


def dns_query(
    name: str,
    qtype: str = "A",
    server: str = LOOPBACK,
    port: int = DNS_PORT,
    timeout: float = 1.0,
    tcp: bool = False,
) -> tuple[str, list[str]]:
    """One query (dnspython, no resolver: straight to `server`): (rcode name, the
    answer section's records as text, e.g. ``"192.0.2.10"`` or ``"10 mx1.example.test."``).

    Raises OSError (TimeoutError) when no answer comes within `timeout`."""
    query = dns.message.make_query(name, qtype)
    send = dns.query.tcp if tcp else dns.query.udp
    try:
        reply = send(query, server, timeout=timeout, port=port)
    except dns.exception.Timeout as exc:
        raise TimeoutError(f"no DNS answer from {server}:{port} in {timeout}s") from exc
    answers = [rd.to_text() for rrset in reply.answer for rd in rrset]
    return dns.rcode.to_text(reply.rcode()), answers


def dns_ping(host: str = LOOPBACK, port: int = DNS_PORT, timeout: float = 0.3) -> bool:
    """True if a DNS server answers (any rcode) on UDP and TCP."""
    try:
        dns_query("ready.mailflow.invalid", "A", host, port, timeout=timeout)
        dns_query("ready.mailflow.invalid", "A", host, port, timeout=timeout, tcp=True)
        return True
    except (OSError, dns.exception.DNSException):
        return False


# --------------------------------------------------------------------------- services


@dataclass
class Service:
    """How to run one daemon: its argv and how to tell that it is ready."""

    name: str
    argv: list[str]
    port: int
    host: str = LOOPBACK
    data_dir: Path = field(default_factory=Path)
    log_file: Path | None = None  # the daemon's own log
    pid_file: Path | None = None
    ready: Callable[[], bool] | None = None  # probe; None means "port accepts TCP"
    udp: bool = False  # port is (also) UDP, for the free-port check
    extra_ports: list[int] = field(default_factory=list)
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def out_file(self) -> Path:
        """stdout/stderr of the process (early errors land here)."""
        return self.data_dir / f"{self.name}.out"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def is_ready(self) -> bool:
        if self.ready is not None:
            return self.ready()
        try:
            socket.create_connection((self.host, self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def ports_in_use(self) -> list[int]:
        return [
            p
            for p in [self.port, *self.extra_ports]
            if _port_in_use(self.host, p, self.udp and p == self.port)
        ]

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for f in (self.out_file, self.log_file):
            if f is not None and f.exists():
                text = f.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    parts.append(f"--- {f} ---\n" + "\n".join(text))
        return "\n".join(parts) or "(no log output)"


def _port_in_use(host: str, port: int, udp: bool = False) -> bool:
    kinds = [socket.SOCK_STREAM, socket.SOCK_DGRAM] if udp else [socket.SOCK_STREAM]
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    return True
                raise
    return False


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def _exe(name: str) -> str:
    path = _which(name)
    if path is None:
        raise RuntimeError(f"{name} not found; install the Debian package {EXECUTABLES[name]}")
    return path


def check_installed() -> list[str]:
    """Missing executables, each as ``"<exe> (Debian package <pkg>)"``; empty if all there."""
    return [
        f"{exe} (Debian package {pkg})" for exe, pkg in EXECUTABLES.items() if _which(exe) is None
    ]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mailflow`` or ``~/.cache/mailflow``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mailflow"


def _mkdirs(*dirs: Path) -> None:
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)


def _run_text(argv: list[str], data: bytes) -> str:
    res = subprocess.run(argv, input=data, capture_output=True, check=False, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.decode(errors='replace')}"
        )
    return res.stdout.decode().strip()


# --------------------------------------------------------------------------- clamd


def write_eicar_db(db_dir: Path) -> list[Path]:
    """Write a ClamAV database detecting EICAR, made with ClamAV's ``sigtool``.

    * ``mailflow-eicar.hsb``: SHA-256 file hash signature (``sigtool --sha256``),
      ``<sha256>:68:Eicar-Test-Signature`` -- exact 68-byte file;
    * ``mailflow-eicar.ndb``: body signature anchored at offset 0 of any file
      (``sigtool --hex-dump``), ``Eicar-Test-Signature:0:0:<hex>`` -- also
      catches the file with trailing whitespace/newline, which EICAR allows.

    clamd applies both to every part it extracts (mail parts, archive members).
    """
    sigtool = _exe("sigtool")
    sha256 = _run_text([sigtool, "--sha256"], EICAR)
    hexdump = _run_text([sigtool, "--hex-dump"], EICAR)
    if sha256 != hashlib.sha256(EICAR).hexdigest() or hexdump != EICAR.hex():
        raise RuntimeError(f"unexpected sigtool output: {sha256!r} {hexdump[:20]!r}...")
    _mkdirs(db_dir)
    hsb = db_dir / "mailflow-eicar.hsb"
    ndb = db_dir / "mailflow-eicar.ndb"
    hsb.write_text(f"{sha256}:{len(EICAR)}:{EICAR_SIGNATURE}\n")
    ndb.write_text(f"{EICAR_SIGNATURE}:0:0:{hexdump}\n")
    return [hsb, ndb]


def prepare_clamd(
    data_dir: Path, port: int = CLAMD_PORT, host: str = LOOPBACK, max_threads: int = 0
) -> Service:
    """Write ``clamd.conf`` and the EICAR database into ``data_dir``; return the Service.

    clamd runs as the invoking user (no ``User`` option; Debian's own config
    says ``User clamav``, which would need the data dir owned by clamav)."""
    data_dir = Path(data_dir).absolute()
    db, tmp, log = data_dir / "db", data_dir / "tmp", data_dir / "log"
    _mkdirs(db, tmp, log)
    write_eicar_db(db)
    threads = max_threads or max(4, min(2 * (os.cpu_count() or 2), 12))
    conf = data_dir / "clamd.conf"
    conf.write_text(
        f"""\
# generated by devtools.services -- do not edit
Foreground yes
TCPSocket {port}
TCPAddr {host}
# LocalSocket deliberately unset: TCP only
DatabaseDirectory {db}
OfficialDatabaseOnly no
TemporaryDirectory {tmp}
PidFile {data_dir / "clamd.pid"}
LogFile {log / "clamd.log"}
LogTime yes
LogFileMaxSize 10M
LogRotate yes
MaxThreads {threads}
MaxConnectionQueueLength 64
ReadTimeout 120
CommandReadTimeout 30
IdleTimeout 30
SelfCheck 0
ConcurrentDatabaseReload no
# mail up to 25 MiB (base64 grows it by 4/3 inside the message)
StreamMaxLength 40M
MaxFileSize 40M
MaxScanSize 200M
MaxRecursion 16
MaxFiles 10000
ScanMail yes
ScanArchive yes
ScanHTML yes
ScanPDF yes
ScanOLE2 yes
AlertBrokenExecutables no
ExtendedDetectionInfo no
"""
    )
    return Service(
        name="clamd",
        argv=[_exe("clamd"), f"--config-file={conf}", "--foreground"],
        port=port,
        host=host,
        data_dir=data_dir,
        log_file=log / "clamd.log",
        pid_file=data_dir / "clamd.pid",
        ready=lambda: clamd_ping(host, port),
    )


# --------------------------------------------------------------------------- rspamd

# Modules switched off (local.d/<module>.conf: enabled = false) and why.
RSPAMD_DISABLED_MODULES: dict[str, str] = {
    # network: DNS blocklists, hash/URL reputation, feeds, HTTP maps
    "rbl": "DNS blocklists (Spamhaus, mailspike, ...) and SURBL/URIBL - internet",
    "fuzzy_check": "UDP to fuzzy1/2.rspamd.com - internet",
    "asn": "ASN lookups in asn.rspamd.com over DNS - internet",
    "phishing": "phishtank over DNS, openphish/redirector/whitelist maps over HTTPS - internet",
    "multimap": "stock freemail/disposable maps are fetched from maps.rspamd.com - internet",
    "whitelist": "maps from maps.rspamd.com, and needs spf/dkim/dmarc results",
    "rspamd_update": "fetches rule updates from maps.rspamd.com",
    "url_redirector": "follows URLs over HTTP, needs redis",
    "dcc": "external DCC service",
    "bimi": "HTTP helper and redis",
    "external_services": "external scanners",
    "antivirus": "we call clamd ourselves",
    # sender authentication: DNS TXT lookups of real domains, meaningless offline
    "spf": "SPF TXT lookups",
    "dkim": "DKIM key lookups (verification)",
    "dmarc": "DMARC TXT lookups, needs spf/dkim",
    "arc": "ARC key lookups",
    # redis based (no redis runs here)
    "neural": "redis",
    "ratelimit": "redis",
    "greylist": "redis",
    "history_redis": "redis",
    "reputation": "redis and DNS",
    "replies": "redis",
    "mx_check": "redis and MX/SMTP probes",
    "clickhouse": "external database",
    "elastic": "external database",
    "metadata_exporter": "external sinks",
    "metric_exporter": "external graphite",
    "p0f": "external p0f socket",
    "spamtrap": "redis",
}


def prepare_rspamd(
    data_dir: Path,
    dns: str = f"{LOOPBACK}:{DNS_PORT}",
    port: int = RSPAMD_PORT,
    controller_port: int = RSPAMD_CONTROLLER_PORT,
    host: str = LOOPBACK,
    workers: int = 0,
    stock_confdir: Path = Path("/etc/rspamd"),
    hs_cache_dir: Path | None = None,
) -> Service:
    """Write an offline rspamd configuration into ``data_dir`` and return the Service.

    The main config (``data_dir/rspamd.conf``) is a trimmed copy of Debian's
    ``/etc/rspamd/rspamd.conf``: it includes the stock ``$CONFDIR/common.conf``
    (all stock rules and modules.d) and our ``$LOCAL_CONFDIR`` =
    ``data_dir/conf`` with ``local.d``/``override.d``; only the normal and
    controller workers, bound to loopback.  DBDIR/RUNDIR/LOGDIR point into the
    data dir via ``--var``.

    ``hs_cache_dir`` holds rspamd's compiled hyperscan databases.  Compiling
    them takes ~15 s on a small machine before the workers start, so by
    default they go to a cache shared by all data dirs,
    ``$XDG_CACHE_HOME/mailflow/rspamd-hs`` (``~/.cache/...``): a fresh data
    dir (e.g. a test run) then starts in about a second.  The files are named
    by a hash of the regexps and checked by rspamd, so sharing is safe.
    """
    data_dir = Path(data_dir).absolute()
    conf_dir, local_d, override_d = (
        data_dir / "conf",
        data_dir / "conf" / "local.d",
        data_dir / "conf" / "override.d",
    )
    db, run, log, tmp = data_dir / "db", data_dir / "run", data_dir / "log", data_dir / "tmp"
    hs_cache = Path(hs_cache_dir).absolute() if hs_cache_dir else default_cache_dir() / "rspamd-hs"
    shutil.rmtree(conf_dir, ignore_errors=True)  # generated: no stale local.d files
    _mkdirs(local_d, override_d, db, run, log, tmp, hs_cache)
    if not (stock_confdir / "common.conf").exists():
        raise RuntimeError(
            f"{stock_confdir}/common.conf not found; install the Debian package rspamd"
        )
    # One normal worker per core: tasks are CPU bound once DNS is local.
    count = workers or max(1, min(os.cpu_count() or 1, 4))

    (data_dir / "rspamd.conf").write_text(
        f"""\
# generated by devtools.services -- do not edit.  Stock rules from $CONFDIR,
# our overrides in $LOCAL_CONFDIR/local.d and override.d.
.include "$CONFDIR/common.conf"

options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
    .include(try=true; priority=10) "$LOCAL_CONFDIR/override.d/options.inc"
}}

logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    .include "$CONFDIR/logging.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/logging.inc"
    .include(try=true; priority=10) "$LOCAL_CONFDIR/override.d/logging.inc"
}}

worker "normal" {{
    bind_socket = "{host}:{port}";
    .include "$CONFDIR/worker-normal.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/worker-normal.inc"
    .include(try=true; priority=10) "$LOCAL_CONFDIR/override.d/worker-normal.inc"
}}

worker "controller" {{
    bind_socket = "{host}:{controller_port}";
    .include "$CONFDIR/worker-controller.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/worker-controller.inc"
    .include(try=true; priority=10) "$LOCAL_CONFDIR/override.d/worker-controller.inc"
}}
# no rspamd_proxy (11332) and no fuzzy storage worker
"""
    )
    files = {
        "options.inc": f"""\
# Only the loopback resolver (dnsmasq); never /etc/resolv.conf.  Answers are
# local and immediate, so short timeouts: a lost packet must not stall a task.
dns {{
    nameserver = ["{dns}"];
    timeout = 0.5s;
    retransmits = 2;
    sockets = 16;
}}
tempdir = "{tmp}";
hs_cache_dir = "{hs_cache}/";
# a scan never waits on the network here
task_timeout = 8s;
""",
        "worker-normal.inc": f"count = {count};\n",
        "logging.inc": 'level = "notice";\n',
    }
    for module in RSPAMD_DISABLED_MODULES:
        files[f"{module}.conf"] = f"# {RSPAMD_DISABLED_MODULES[module]}\nenabled = false;\n"
    for fname, text in files.items():
        (local_d / fname).write_text(text)
    # Keep these modules, but with Debian's bundled maps only: their stock map
    # lists start with https://maps.rspamd.com/...; override.d replaces the
    # list (local.d would append to it).
    overrides = {
        "mime_types.conf": (
            "# stock list starts with https://maps.rspamd.com/rspamd/mime_types.inc.zst\n"
            'file = ["$LOCAL_CONFDIR/local.d/maps.d/mime_types.inc.local", '
            '"${CONFDIR}/maps.d/mime_types.inc"];\n'
        ),
        "mid.conf": (
            "# stock list starts with https://maps.rspamd.com/rspamd/mid.inc.zst\n"
            'source { url = ["$LOCAL_CONFDIR/local.d/maps.d/mid.inc", "${CONFDIR}/maps.d/mid.inc"]; }\n'
        ),
    }
    for fname, text in overrides.items():
        (override_d / fname).write_text(text)

    argv = [
        _exe("rspamd"),
        "-f",  # --no-fork: stay in the foreground
        "-c",
        str(data_dir / "rspamd.conf"),
        f"--var=CONFDIR={stock_confdir}",
        f"--var=LOCAL_CONFDIR={conf_dir}",
        f"--var=DBDIR={db}",
        f"--var=RUNDIR={run}",
        f"--var=LOGDIR={log}",
    ]
    if os.geteuid() == 0:
        # Workers refuse to run as root without -i; the data dir may be
        # unreadable for _rspamd (e.g. pytest's 0700 tmp dirs), so stay root.
        argv.append("-i")
    return Service(
        name="rspamd",
        argv=argv,
        port=port,
        host=host,
        data_dir=data_dir,
        log_file=log / "rspamd.log",
        pid_file=run / "rspamd.pid",
        ready=lambda: rspamd_ping(host, port) and rspamd_ping(host, controller_port),
        extra_ports=[controller_port],
    )


# --------------------------------------------------------------------------- dnsmasq


def prepare_dnsmasq(
    data_dir: Path,
    extra_conf: str = "",
    port: int = DNS_PORT,
    host: str = LOOPBACK,
    local_domains: Sequence[str] = ("#",),
    log_queries: bool = False,
) -> Service:
    """Write ``dnsmasq.conf`` into ``data_dir`` and return the Service.

    ``extra_conf`` is dnsmasq config text with the records, e.g.
    ``host-record=mx1.example.test,127.0.0.1`` / ``address=/a.test/192.0.2.1``
    / ``mx-host=example.test,mx1.example.test,10`` / null MX
    ``mx-host=nullmx.test,.,0``.  ``local_domains`` are answered from local
    data only, unknown names there get NXDOMAIN; the default ``"#"`` means
    every domain (a closed world: dnsmasq has no upstream servers anyway, and
    would answer REFUSED for names outside them)."""
    data_dir = Path(data_dir).absolute()
    _mkdirs(data_dir)
    records = data_dir / "records.conf"
    records.write_text(
        extra_conf if extra_conf.endswith("\n") or not extra_conf else extra_conf + "\n"
    )
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    local = "\n".join(f"local=/{d.strip('.')}/" for d in local_domains)
    conf = data_dir / "dnsmasq.conf"
    conf.write_text(
        f"""\
# generated by devtools.services -- do not edit; records go to records.conf
port={port}
listen-address={host}
bind-interfaces
# no upstream servers, no /etc/hosts, no DHCP (no dhcp-range given)
no-resolv
no-poll
no-hosts
{local}
# dnsmasq would otherwise drop privileges to nobody/dnsmasq
user={user}
group={group}
pid-file={data_dir / "dnsmasq.pid"}
log-facility={data_dir / "dnsmasq.log"}
local-ttl=1
{"log-queries" if log_queries else "# log-queries"}
conf-file={records}
"""
    )
    return Service(
        name="dnsmasq",
        argv=[_exe("dnsmasq"), f"--conf-file={conf}", "--keep-in-foreground"],
        port=port,
        host=host,
        data_dir=data_dir,
        log_file=data_dir / "dnsmasq.log",
        pid_file=data_dir / "dnsmasq.pid",
        ready=lambda: dns_ping(host, port),
        udp=True,
    )


# --------------------------------------------------------------------------- group


class ServiceGroup:
    """Start several services, wait until all are ready, stop them all.

    Each daemon is started in its own session/process group, so that stopping
    signals the whole group (rspamd forks workers): SIGTERM, then SIGKILL
    after ``stop_timeout`` seconds."""

    def __init__(
        self,
        services: list[Service],
        log: Callable[[str], object] = print,
        stop_timeout: float = 10.0,
    ):
        self.services = list(services)
        self.log = log
        self.stop_timeout = stop_timeout
        self._started: list[Service] = []
        self._lock = threading.Lock()

    # -- lifecycle
    def start(self, timeout: float = 120) -> None:
        """Start all services and wait until every one is ready.

        Raises RuntimeError naming the service, with the tail of its log, if a
        port is already taken, a daemon exits, or it is not ready in time;
        whatever was started is stopped again."""
        try:
            for svc in self.services:
                busy = svc.ports_in_use()
                if busy:
                    raise RuntimeError(
                        f"{svc.name}: port(s) {busy} on {svc.host} already in use "
                        "(another instance running? ensure_running() reuses one)"
                    )
            for svc in self.services:
                self._spawn(svc)
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, svc: Service) -> None:
        svc.data_dir.mkdir(parents=True, exist_ok=True)
        if svc.pid_file is not None:
            svc.pid_file.unlink(missing_ok=True)
        env = dict(os.environ, **(svc.env or {}))
        with open(svc.out_file, "ab") as out:
            svc.proc = subprocess.Popen(
                svc.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=svc.data_dir,
                env=env,
                start_new_session=True,
                # A daemon outlives neither us nor a SIGKILL of us; SIGTERM lets
                # rspamd's main process stop its own workers.
                preexec_fn=die_with_parent(signal.SIGTERM),
            )
        with self._lock:
            self._started.append(svc)
        if len(self._started) == 1:
            atexit.register(self.stop)
        self.log(f"{svc.name}: started pid {svc.proc.pid}: {' '.join(svc.argv)}")

    def _wait_ready(self, timeout: float) -> None:
        t0 = time.monotonic()
        pending = list(self.services)
        while pending:
            for svc in list(pending):
                assert svc.proc is not None
                rc = svc.proc.poll()
                if rc is not None:
                    raise RuntimeError(
                        f"{svc.name} exited with code {rc} while starting:\n{svc.log_tail()}"
                    )
                if svc.is_ready():
                    pending.remove(svc)
                    self.log(
                        f"{svc.name}: ready on {svc.address} after {time.monotonic() - t0:.1f}s"
                    )
            if pending and time.monotonic() - t0 > timeout:
                svc = pending[0]
                raise RuntimeError(
                    f"{svc.name} not ready on {svc.address} after {timeout:.0f}s:\n{svc.log_tail()}"
                )
            if pending:
                time.sleep(0.1)

    def check_alive(self) -> list[str]:
        """Names of started services whose process has exited."""
        return [s.name for s in self._started if s.proc is not None and s.proc.poll() is not None]

    def stop(self) -> None:
        """SIGTERM each process group, SIGKILL after the timeout; idempotent."""
        with self._lock:
            started, self._started = self._started, []
        if not started:
            return
        atexit.unregister(self.stop)
        for svc in started:
            _signal_group(svc, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for svc in reversed(started):
            proc = svc.proc
            assert proc is not None
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"{svc.name}: no exit after SIGTERM, sending SIGKILL")
                _signal_group(svc, signal.SIGKILL)
                proc.wait(5)
            # leftovers of the group (forked workers) once the leader is gone
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _group_alive(proc.pid):
                _signal_group(svc, signal.SIGKILL)
            self.log(f"{svc.name}: stopped (exit code {proc.returncode})")

    def __enter__(self) -> ServiceGroup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(svc: Service, sig: signal.Signals) -> None:
    if svc.proc is None:
        return
    try:
        os.killpg(svc.proc.pid, sig)  # pgid == pid thanks to start_new_session
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# --------------------------------------------------------------------------- helpers


def prepare_all(
    data_dir: Path = DEFAULT_DATA_DIR, dns_conf: str = DEFAULT_DNS_CONF
) -> list[Service]:
    """The three services under ``data_dir/<name>/``, on the default ports, dnsmasq first."""
    data_dir = Path(data_dir)
    return [
        prepare_dnsmasq(data_dir / "dnsmasq", dns_conf),
        prepare_clamd(data_dir / "clamd"),
        prepare_rspamd(data_dir / "rspamd"),
    ]


_PROBES: dict[str, Callable[[], bool]] = {
    "dnsmasq": lambda: dns_ping(LOOPBACK, DNS_PORT),
    "clamd": lambda: clamd_ping(LOOPBACK, CLAMD_PORT),
    "rspamd": lambda: rspamd_ping(LOOPBACK, RSPAMD_PORT),
}


def ensure_running(
    data_dir: Path = DEFAULT_DATA_DIR,
    dns_conf: str = DEFAULT_DNS_CONF,
    timeout: float = 120,
    log: Callable[[str], object] = print,
) -> ServiceGroup | None:
    """Make sure clamd, rspamd and dnsmasq answer on their default ports.

    Services that already answer (e.g. started by another test session or by
    ``python -m devtools.services up``) are reused as they are; the others are
    started from ``data_dir/<name>/``.  Returns the ServiceGroup of what was
    started -- the caller stops it -- or None if all three were running."""
    running = {name for name, probe in _PROBES.items() if probe()}
    if len(running) == len(_PROBES):
        log("services: clamd, rspamd and dnsmasq already running; reusing them")
        return None
    if running:
        log(f"services: reusing running {', '.join(sorted(running))}")
    data_dir = Path(data_dir)
    builders: dict[str, Callable[[], Service]] = {
        "dnsmasq": lambda: prepare_dnsmasq(data_dir / "dnsmasq", dns_conf),
        "clamd": lambda: prepare_clamd(data_dir / "clamd"),
        "rspamd": lambda: prepare_rspamd(data_dir / "rspamd"),
    }
    group = ServiceGroup(
        [build() for name, build in builders.items() if name not in running], log=log
    )
    group.start(timeout)
    return group


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m devtools.services", description=__doc__.split("\n\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="check that the daemons are installed")
    up = sub.add_parser(
        "up", help="run clamd, rspamd and dnsmasq in the foreground until Ctrl-C/SIGTERM"
    )
    up.add_argument(
        "--dir", type=Path, default=DEFAULT_DATA_DIR, help="data dir (default %(default)s)"
    )
    up.add_argument(
        "--dns-conf", type=Path, help="dnsmasq records file (default: the built-in test zone)"
    )
    up.add_argument("--timeout", type=float, default=120, help="seconds to wait for readiness")
    args = ap.parse_args(argv)

    missing = check_installed()
    if args.cmd == "check":
        if missing:
            print("missing: " + ", ".join(missing))
            pkgs = sorted({EXECUTABLES[m.split()[0]] for m in missing})
            print("install with: apt-get install -y " + " ".join(pkgs))
            return 1
        for exe in EXECUTABLES:
            print(f"{exe}: {_which(exe)}")
        return 0
    if missing:
        print("missing: " + ", ".join(missing), file=sys.stderr)
        return 1

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    dns_conf = args.dns_conf.read_text() if args.dns_conf else DEFAULT_DNS_CONF

    def say(msg: str) -> None:
        print(msg, flush=True)

    group = ServiceGroup(prepare_all(args.dir, dns_conf), log=say)
    try:
        group.start(args.timeout)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    say(f"all services ready (data in {args.dir.absolute()}); Ctrl-C to stop")
    rc = 0
    try:
        while not stop.wait(0.5):
            dead = group.check_alive()
            if dead:
                for svc in group.services:
                    if svc.name in dead:
                        print(
                            f"error: {svc.name} exited unexpectedly:\n{svc.log_tail()}",
                            file=sys.stderr,
                        )
                rc = 1
                break
    finally:
        group.stop()
    return rc


if __name__ == "__main__":
    sys.exit(main())
