"""Settings, read once from the environment (prefix ``MAILFLOW_``).

Names and defaults follow ../shared/CONTRACT.md. Every process (API, each stage,
the CLI) builds its `Settings` with `Settings.from_env()`, so one environment
configures the whole stack.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``250ms``, ``30s``, ``2m``, ``4h``, ``5d``.

    A bare number is seconds.
    """
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 30s, 5m, 4h, 5d)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_rate(text: str) -> tuple[int, float]:
    """``100/60s`` -> (100, 60.0): at most 100 messages per 60-second window."""
    try:
        count, _, window = text.partition("/")
        return int(count), parse_duration(window or "60s")
    except ValueError as exc:
        raise ValueError(f"not a rate: {text!r} (use COUNT/DURATION, e.g. 100/60s)") from exc


def parse_size(text: str) -> int:
    """Bytes in ``26214400``, ``25MiB``, ``512KiB``, ``10MB``."""
    m = re.match(r"^\s*(\d+)\s*([KMG]i?B)?\s*$", text, re.I)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 26214400 or 25MiB)")
    unit = (m.group(2) or "").upper()
    mult = {"": 1, "KB": 1000, "MB": 10**6, "GB": 10**9, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    return int(m.group(1)) * mult[unit]


def parse_routes(text: str) -> dict[str, tuple[str, int]]:
    """``example.com=127.0.0.1:2525,*=smarthost:25`` -> {domain: (host, port)}."""
    routes: dict[str, tuple[str, int]] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        domain, sep, dest = item.partition("=")
        host, _, port = dest.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"bad SMTP route {item!r} (use domain=host:port or *=host:port)")
        routes[domain.strip().lower()] = (host.strip("[]"), int(port))
    return routes


def node_port(base: int, node: int) -> int:
    """The port of node `node` (from 1) of a local N-node Kafka cluster (`mailflow
    broker --nodes N`, devtools/broker.py): ``base + 2(node-1)``, for its client
    port (base 9092) and its controller port (base 9093) alike."""
    return base + 2 * (node - 1)


def cluster_bootstrap(nodes: int, port: int = 9092, host: str = "127.0.0.1") -> str:
    """Every node's client address of a local N-node cluster, comma-separated: what
    clients must be given so that one node down does not keep a (re)starting client
    from the cluster. The default bootstrap where ``MAILFLOW_BROKER_NODES`` > 1."""
    return ",".join(f"{host}:{node_port(port, k)}" for k in range(1, nodes + 1))


def _env(name: str, default: str) -> str:
    return os.environ.get(f"MAILFLOW_{name}", default)


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str = "127.0.0.1:9092"
    data_dir: Path = Path("var")
    object_store: str = ""  # empty: file URL under data_dir
    local_domains: frozenset[str] = frozenset({"mailflow.local"})
    smtp_routes: dict[str, tuple[str, int]] = field(default_factory=dict)
    max_message_bytes: int = 25 * 1024 * 1024
    rate_limit: tuple[int, float] = (100, 60.0)
    retry_schedule: tuple[float, ...] = (60, 120, 240, 480, 960, 1920, 3600, 7200, 14400)
    max_queue_age: float = 5 * 86400.0
    clamd: str = "127.0.0.1:3310"
    rspamd: str = "http://127.0.0.1:11333"
    scan_failure: str = "closed"
    scanners: tuple[str, ...] = ("clamd", "rspamd")  # MAILFLOW_SCANNERS=none turns scanning off
    dns: str = ""  # nameservers for MX lookups (host:port,...); empty: the system's
    smtp_timeout: float = 30.0
    smtp_tls: str = "opportunistic"  # opportunistic | required | off
    tls_ca_file: str = ""  # PEM CAs trusted for MX certificates besides the system's
    dkim: str = "sign-if-key"  # sign-if-key | required (mailflow.mta.signing)
    mta_sts: bool = True  # MTA-STS policies of recipient domains (mailflow.mta.mtasts)
    mta_sts_port: int = 443  # the policy hosts' HTTPS port (tests only)
    max_connections_per_host: int = 8
    domain_rate: tuple[int, float] | None = None  # per destination domain, e.g. 600/60s
    topic_prefix: str = "mailflow."
    partitions: int = 4
    replication: int = 1
    # Nodes of the local Kafka cluster `mailflow broker`/`mailflow up` run (1: one
    # broker). With more, KAFKA_BOOTSTRAP defaults to every node's address and
    # REPLICATION to min(3, nodes).
    broker_nodes: int = 1
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    # Slow clients (mailflow.api.server): a connection must send a whole request's
    # headers this long after it opens or after its last answer (also the keep-alive
    # idle time), and a submission's whole body within api_body_timeout.
    api_header_timeout: float = 15.0
    api_body_timeout: float = 120.0
    lag_port: int = 9308  # `mailflow up`'s lag exporter (Prometheus gauges)
    advertise_host: str = ""  # how other processes reach this worker's web port
    # bodies above this travel by reference through the object store (claim check)
    inline_max_bytes: int = 256 * 1024
    max_recipients: int = 1000
    ehlo_name: str = "mailflow.localhost"
    # In-flow control (mailflow.api.inflow): above this many messages waiting in the
    # pipeline a submission waits up to in_flow_delay seconds first. 0 turns it off.
    in_flow_backlog: int = 5000
    in_flow_delay: float = 1.0
    # uvloop (libuv) unless set to asyncio: Faust's per-event futures and aiohttp's
    # requests spend much of their time in the event loop's scheduling.
    event_loop: str = "uvloop"

    @classmethod
    def from_env(cls) -> Settings:
        d = cls()
        nodes = int(_env("BROKER_NODES", str(d.broker_nodes)))
        if nodes < 1:
            raise ValueError(f"MAILFLOW_BROKER_NODES must be at least 1, not {nodes}")
        bootstrap = d.kafka_bootstrap
        if nodes > 1:
            bootstrap = cluster_bootstrap(nodes)
        return cls(
            kafka_bootstrap=_env("KAFKA_BOOTSTRAP", bootstrap),
            broker_nodes=nodes,
            data_dir=Path(_env("DATA_DIR", str(d.data_dir))).absolute(),
            object_store=_env("OBJECT_STORE", ""),
            local_domains=frozenset(
                x.strip().lower()
                for x in _env("LOCAL_DOMAINS", ",".join(d.local_domains)).split(",")
                if x.strip()
            ),
            smtp_routes=parse_routes(_env("SMTP_ROUTES", "")),
            max_message_bytes=parse_size(_env("MAX_MESSAGE_BYTES", str(d.max_message_bytes))),
            rate_limit=parse_rate(_env("RATE_LIMIT", "100/60s")),
            retry_schedule=tuple(
                parse_duration(x)
                for x in _env("RETRY_SCHEDULE", "1m,2m,4m,8m,16m,32m,1h,2h,4h").split(",")
                if x.strip()
            ),
            max_queue_age=parse_duration(_env("MAX_QUEUE_AGE", "5d")),
            clamd=_env("CLAMD", d.clamd),
            rspamd=_env("RSPAMD", d.rspamd),
            scan_failure=_choice("SCAN_FAILURE", _env("SCAN_FAILURE", d.scan_failure), ("closed", "open")),
            scanners=tuple(x.strip() for x in _env("SCANNERS", "clamd,rspamd").split(",")
                           if x.strip() and x.strip() != "none"),
            dns=_env("DNS", ""),
            smtp_timeout=parse_duration(_env("SMTP_TIMEOUT", "30s")),
            smtp_tls=_choice("SMTP_TLS", _env("SMTP_TLS", d.smtp_tls), ("opportunistic", "required", "off")),
            tls_ca_file=_env("TLS_CA_FILE", ""),
            dkim=_choice("DKIM", _env("DKIM", d.dkim), ("sign-if-key", "required")),
            mta_sts=_choice("MTA_STS", _env("MTA_STS", "on"), ("on", "off")) == "on",
            mta_sts_port=int(_env("MTA_STS_PORT", str(d.mta_sts_port))),
            max_connections_per_host=int(_env("MAX_CONNECTIONS_PER_HOST", "8")),
            domain_rate=parse_rate(_env("DOMAIN_RATE", "")) if _env("DOMAIN_RATE", "") else None,
            topic_prefix=_env("TOPIC_PREFIX", d.topic_prefix),
            partitions=int(_env("PARTITIONS", str(d.partitions))),
            replication=int(_env("REPLICATION", str(min(3, nodes)))),
            api_host=_env("API_HOST", d.api_host),
            api_port=int(_env("API_PORT", str(d.api_port))),
            api_header_timeout=parse_duration(_env("API_HEADER_TIMEOUT", f"{d.api_header_timeout}s")),
            api_body_timeout=parse_duration(_env("API_BODY_TIMEOUT", f"{d.api_body_timeout}s")),
            lag_port=int(_env("LAG_PORT", str(d.lag_port))),
            advertise_host=_env("ADVERTISE_HOST", ""),
            inline_max_bytes=parse_size(_env("INLINE_MAX_BYTES", str(d.inline_max_bytes))),
            ehlo_name=_env("EHLO_NAME", d.ehlo_name),
            in_flow_backlog=int(_env("IN_FLOW_BACKLOG", str(d.in_flow_backlog))),
            in_flow_delay=parse_duration(_env("IN_FLOW_DELAY", "1s")),
            event_loop=_choice("EVENT_LOOP", _env("EVENT_LOOP", d.event_loop), ("uvloop", "asyncio")),
        )

    @property
    def web_advertise_host(self) -> str:
        """The bind host, unless it is a wildcard: then this machine's name."""
        if self.advertise_host:
            return self.advertise_host
        if self.api_host in ("0.0.0.0", "::", ""):
            import socket

            return socket.gethostname()
        return self.api_host

    @cached_property  # read per message body by several stages
    def object_store_url(self) -> str:
        return self.object_store or (self.data_dir / "objects").absolute().as_uri()

    def is_local(self, address: str) -> bool:
        return address.rpartition("@")[2].lower() in self.local_domains


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"MAILFLOW_{name} must be {' or '.join(allowed)}, not {value!r}")
    return value

