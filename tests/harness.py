"""Test harness: the real broker, real stage processes, the real API, over real sockets.

One Kafka broker serves the whole session (started here unless one already answers
on 127.0.0.1:9092). Each `Stack` gets its own topic prefix, so its topics and
consumer groups are its own, and its own data dir.
"""

from __future__ import annotations

import email
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from email import policy
from email.message import Message as EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from schemas.states import FINAL

if TYPE_CHECKING:
    from confluent_kafka import Producer

ROOT = Path(__file__).resolve().parents[1]
BOOTSTRAP = os.environ.get("MAILFLOW_TEST_BOOTSTRAP", "127.0.0.1:9092")



def settled(stack: Stack, ids: list[str]) -> bool:
    """Every recipient of every message in `ids` is in a final state."""
    for i in ids:
        st = stack.status(i)
        if not st or not st["recipients"] or not all(r["state"] in FINAL for r in st["recipients"].values()):
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ephemeral_low(default: int = 32768) -> int:
    """The lowest port the kernel hands out to outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def free_ports(count: int) -> int:
    """The first of `count` consecutive free loopback ports, below the ephemeral range.

    For a broker that is killed and started again on its port: a client reconnecting
    to a port of the ephemeral range while nothing listens there can be given that
    very port as its own and connect to itself (TCP simultaneous open), and then the
    broker cannot bind it (a cluster chaos run: "Address already in use" for two
    minutes after a node's restart, 127.0.0.1:33638 connected to 127.0.0.1:33638).
    """
    import random

    top = min(40000, ephemeral_low()) - count
    for _ in range(200):
        base = random.randrange(15000, top)
        try:
            for p in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports")


def wait_for(check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


# API base URL -> the credential its Stack created (an admin key, domains `*`).
CREDENTIALS: dict[str, str] = {}


def http(method: str, url: str, body: Any = None, ctype: str = "application/json",
         headers: dict[str, str] | None = None, timeout: float = 30,
         auth: str | bool | None = True) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON or bytes, headers).

    `auth`: True sends the admin key of the Stack serving `url` (if any); a string
    sends that credential; None or False sends no Authorization header.
    """
    data = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", ctype)
    if auth is True:
        auth = next((c for base, c in CREDENTIALS.items() if url.startswith(base + "/")), None)
    if auth and not any(k.lower() == "authorization" for k in (headers or {})):
        req.add_header("Authorization", f"Bearer {auth}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status, hdrs = resp.read(), resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw, status, hdrs = exc.read(), exc.code, dict(exc.headers)
    if hdrs.get("Content-Type", "").startswith("application/json"):
        return status, orjson.loads(raw), hdrs
    return status, raw, hdrs


def raw_http(base: str, head: bytes, body: bytes = b"", timeout: float = 30,
             pause: float = 0.0) -> tuple[int, dict[str, str], bytes]:
    """Send `head` (request line and headers, CRLF-terminated, without the blank
    line) and `body` to `base` over a plain socket, exactly as given: no client
    quoting or dot-normalising of the target, any bytes at all. (status, headers,
    body); status 0 when the server closed without answering. `pause` seconds
    pass between the header section and the body.
    """
    import http.client

    host, _, port = base.removeprefix("http://").partition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head + b"\r\n")
        if pause:
            time.sleep(pause)
        try:
            sock.sendall(body)
        except OSError:  # the server answered and closed before the body
            pass
        resp = http.client.HTTPResponse(sock)
        try:
            resp.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return 0, {}, b""
        data = resp.read()
        return resp.status, dict(resp.getheaders()), data


def get_raw_target(base: str, target: bytes, auth: str | None) -> tuple[int, dict[str, str], bytes]:
    """GET the request target `target` (bytes, sent as they are) with `auth`."""
    head = b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
    if auth:
        head += b"Authorization: Bearer " + auth.encode() + b"\r\n"
    return raw_http(base, head)


class Broker:
    """A `mailflow broker` process of our own (or none, if one already runs)."""

    def __init__(self, data_dir: Path, port: int = 9092, controller_port: int = 9093,
                 heap: str | None = None) -> None:
        self.data_dir = data_dir
        self.port = port
        self.controller_port = controller_port
        self.heap = heap  # the JVM's -Xmx; None: `mailflow broker`'s default
        self.proc: subprocess.Popen[bytes] | None = None
        self.bootstrap = f"127.0.0.1:{port}"

    def start(self, timeout: float = 180) -> None:
        from devtools.broker import is_ready

        env = {**os.environ, "MAILFLOW_DATA_DIR": str(self.data_dir)}
        log = open(self.data_dir / f"broker-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailflow.ops.cli", "broker", "--port", str(self.port),
             "--controller-port", str(self.controller_port),
             *(["--heap", self.heap] if self.heap else [])],
            env=env, stdout=log, stderr=log, start_new_session=True)
        wait_for(lambda: is_ready(self.bootstrap) or self.proc.poll() is not None, timeout,
                 what=f"broker on {self.port}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"broker exited: see {log.name}")

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Cluster:
    """A local KRaft cluster of our own: each node its own ``mailflow broker --nodes N
    --node K`` process (so one can be killed -9 and started again while the others
    serve), on consecutive free ports from `port` (node k: ``port + 2(k-1)``, its
    controller the port after), data under `data_dir`. Never the shared 9092."""

    def __init__(self, data_dir: Path, nodes: int = 3, port: int | None = None,
                 heap: str | None = None) -> None:
        from devtools.broker import cluster_nodes

        self.data_dir = data_dir
        self.heap = heap  # each JVM's -Xmx; None: `mailflow broker`'s default (512m)
        self.port = port or free_ports(2 * nodes)
        self.nodes = cluster_nodes(nodes, self.port)
        self.bootstrap = ",".join(n.bootstrap for n in self.nodes)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, timeout: float = 180) -> None:
        """Start every node; return once all are registered with the cluster."""
        from devtools.broker import cluster_ready

        for n in self.nodes:
            self.start_node(n.node_id, wait=False)
        wait_for(lambda: cluster_ready(self.bootstrap, len(self.nodes))
                 or any(p.poll() is not None for p in self.procs.values()), timeout,
                 what=f"{len(self.nodes)}-node cluster on {self.port}")
        dead = [k for k, p in self.procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"cluster nodes {dead} exited: see {self.data_dir}/node-*.log")

    def start_node(self, node_id: int, wait: bool = True, timeout: float = 120) -> None:
        """Start one node (again); with `wait`, until it answers on its own port."""
        from devtools.broker import is_ready

        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MAILFLOW_DATA_DIR": str(self.data_dir)}
        log = open(self.data_dir / f"node-{node_id}.log", "ab")  # noqa: SIM115
        self.procs[node_id] = proc = subprocess.Popen(
            [sys.executable, "-m", "mailflow.ops.cli", "broker", "--nodes", str(len(self.nodes)),
             "--node", str(node_id), "--port", str(self.port),
             *(["--heap", self.heap] if self.heap else [])],
            env=env, stdout=log, stderr=log, start_new_session=True)
        if wait:
            node = self.nodes[node_id - 1]
            wait_for(lambda: is_ready(node.bootstrap) or proc.poll() is not None, timeout,
                     what=f"cluster node {node_id}")
            if proc.poll() is not None:
                raise RuntimeError(f"cluster node {node_id} exited: see {log.name}")

    def alive(self, node_id: int) -> bool:
        p = self.procs.get(node_id)
        return p is not None and p.poll() is None

    def kill_node(self, node_id: int, sig: int = signal.SIGKILL) -> None:
        """Signal one node's process group (the JVM with it) and reap it."""
        p = self.procs[node_id]
        if p.poll() is None:
            os.killpg(p.pid, sig)
            p.wait(60)

    def leaders(self, prefix: str = "") -> dict[int, int]:
        """Node id -> how many partitions (of topics named from `prefix`) it leads."""
        from confluent_kafka.admin import AdminClient

        md = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=10)
        out = {n.node_id: 0 for n in self.nodes}
        for name, t in md.topics.items():
            if name.startswith(prefix):
                for p in t.partitions.values():
                    if p.leader in out:
                        out[p.leader] += 1
        return out

    def under_replicated(self, prefix: str = "") -> list[str]:
        """Partitions (of topics named from `prefix`) whose in-sync replicas are fewer
        than their replicas, as ``topic/partition``."""
        from confluent_kafka.admin import AdminClient

        md = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=10)
        return sorted(f"{name}/{p.id}" for name, t in md.topics.items() if name.startswith(prefix)
                      for p in t.partitions.values() if len(p.isrs) < len(p.replicas))

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


class Stack:
    """Stage processes and an API for one test scenario, isolated by topic prefix."""

    def __init__(self, base: Path, bootstrap: str = BOOTSTRAP, **settings: str) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:8]}."
        self.data_dir = base / self.prefix.rstrip(".")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.api_port = free_port()
        self.env = {
            **os.environ,
            "MAILFLOW_KAFKA_BOOTSTRAP": bootstrap,
            "MAILFLOW_DATA_DIR": str(self.data_dir),
            "MAILFLOW_TOPIC_PREFIX": self.prefix,
            "MAILFLOW_API_PORT": str(self.api_port),
            "MAILFLOW_LOCAL_DOMAINS": "mailflow.test,local.test",
            "MAILFLOW_PARTITIONS": "4",
            **{f"MAILFLOW_{k.upper()}": v for k, v in settings.items()},
        }
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {}
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.key: str | None = None  # admin API key (domains `*`), made by start()

    def settings(self) -> Any:
        from mailflow.config import Settings

        old = dict(os.environ)
        os.environ.update(self.env)
        try:
            return Settings.from_env()
        finally:
            os.environ.clear()
            os.environ.update(old)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        logdir = self.data_dir / "logs"
        logdir.mkdir(exist_ok=True)
        log = open(logdir / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "mailflow.ops.cli", *argv], env=self.env,
                                stdout=log, stderr=log, start_new_session=True, cwd=ROOT)
        self.procs.setdefault(name, []).append(proc)
        return proc

    def start_stage(self, stage: str) -> subprocess.Popen[bytes]:
        # Info level: a stage that stalls in CI leaves its rebalance and recovery in the log.
        return self._spawn(stage, ["worker", "--stages", stage, "--loglevel", "info"])

    def start_api(self) -> None:
        self._spawn("api", ["api"])
        wait_for(lambda: self._up(), 60, what="API")

    def _up(self) -> bool:
        try:
            return http("GET", f"{self.api}/healthz")[0] == 200
        except OSError:
            return False

    def start(self, stages: list[str]) -> Stack:
        from streams.topics import ensure_topics

        ensure_topics(self.settings())
        self.ensure_key()
        for s in stages:
            self.start_stage(s)
        self.start_api()
        for s in stages:
            self.wait_stage(s)
        return self

    def ensure_key(self) -> str:
        """This stack's admin key (domains `*`), which `http()` sends by default."""
        if self.key is None:
            from mailflow.api.auth import create_key

            self.key, _ = create_key(self.settings(), ["*"], name="tests")
            CREDENTIALS[self.api] = self.key
        return self.key

    def token(self, address: str) -> str:
        """A new mailbox token for `address` on this stack."""
        from mailflow.api.auth import create_token

        return create_token(self.settings(), address)[0]

    def wait_stage(self, stage: str, timeout: float = 120) -> None:
        """Until a replica of `stage` has registered (its consumer is running)."""
        def registered() -> bool:
            ing = self.registry()
            return any(v.get("stage") == stage for v in ing.values())
        wait_for(registered, timeout, what=f"stage {stage} to register")

    def registry(self) -> dict[str, Any]:
        """Live worker entries on this stack's ``registry`` topic."""
        out: dict[str, Any] = {}
        for key, value in self.read_topic("registry", timeout=5):
            if key is not None and value:
                out[key.decode()] = orjson.loads(value)
        return out

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        for p in self.procs.get(name, []):
            if p.poll() is None:
                os.killpg(p.pid, sig)
                p.wait(60)

    def kill_one(self, name: str, index: int = 0, sig: int = signal.SIGKILL) -> subprocess.Popen[bytes]:
        """Kill one live replica of `name` (the `index`-th still running), not all of them."""
        live = [p for p in self.procs.get(name, []) if p.poll() is None]
        p = live[index]
        os.killpg(p.pid, sig)
        p.wait(60)
        return p

    def stop(self) -> None:
        for procs in self.procs.values():
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
        for procs in self.procs.values():
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()

    # ---- "no second copy": a marker sent behind the message under test ----
    def send_marker(self, sender: str, domain: str, direct: bool = False) -> str:
        """Send a marker message from `sender` to ``marker@<domain>``; its Message-ID.

        Sent once the message under test is final, it goes the same way: through the
        API by default (``submissions`` and ``admitted`` are keyed by sender, so it
        follows the same partitions there; ``outgoing`` and ``clean`` are keyed by
        message id, which gives no order), or with `direct` straight onto ``delivery``
        for a test whose messages were produced there. On ``delivery`` (key: the
        recipient domain) it lands on the same partition as every copy of the message
        under test that was written before it, which is what `wait_markers` relies on.
        """
        mid = f"<marker.{time.time_ns()}@t.test>"
        rcpt = f"marker@{domain}"
        raw = raw_mail(sender, rcpt, "marker", mid)
        if not direct:
            submit_raw(self, raw)
            return mid
        from mailflow.ids import new_id
        from schemas.records import Message

        msg = Message(id=new_id(), sender=sender, recipients=[rcpt], received_at=time.time(),
                      size=len(raw), body=raw, meta={"domain": domain})
        p = producer(self)
        p.produce(f"{self.prefix}delivery", key=domain.encode(), value=msg.to_json())
        assert p.flush(30) == 0
        return mid

    def wait_markers(self, marks: list[tuple[ScriptedPeer, str]], timeout: float = 120) -> None:
        """Until each marker (peer, Message-ID) of `send_marker` has reached its peer
        and the deliver stage has finished every record ahead of it.

        The deliver stage runs 32 records at once, so a copy of the message under test
        just ahead of a marker may still be in its SMTP transaction when the marker
        arrives: the wait ends only once the stage's group has committed past every
        record on ``delivery`` as of the markers' arrival (`caught_up`), and it
        commits an offset only after every record before it is done. After this, a
        copy written to ``delivery`` before the marker has reached its peer or never
        will. A copy that waits on a retry tier is not ahead of the marker on
        ``delivery``: a test with one in play waits for ``caught_up("retry")`` before
        it sends the marker.
        """
        for peer, mid in marks:
            wait_for(lambda p=peer, m=mid: p.with_id(m), timeout, interval=0.2, what=f"marker {mid}")
        self.caught_up("deliver", timeout=timeout)

    def wait_marker(self, peer: ScriptedPeer, mid: str, timeout: float = 120) -> None:
        """`wait_markers` for one marker."""
        self.wait_markers([(peer, mid)], timeout)

    def caught_up(self, stage: str, topics: tuple[str, ...] | None = None, timeout: float = 60) -> None:
        """Until `stage`'s consumer group has committed past every record now on its
        input topics (only those of `topics`, short names, if given), by the lag rule of
        `mailflow lag`: each partition's committed offset reaches the end offset read
        here, or the partition has no lag. Later records need not be done."""
        from mailflow.ops.lag import measure

        settings = self.settings()
        wanted = {f"{self.prefix}{t}" for t in topics} if topics else None

        def parts() -> list[Any]:
            (lag,) = measure(settings, [stage])
            return [p for p in lag.partitions if wanted is None or p.topic in wanted]

        ends = {(p.topic, p.partition): p.end for p in parts()}
        assert ends, f"no input partitions of {stage}"

        def done() -> bool:
            return not [p for p in parts() if p.lag and (
                p.committed is None or p.committed < ends.get((p.topic, p.partition), 0))]

        wait_for(done, timeout, interval=0.5, what=f"{stage} to commit past {sum(ends.values())} records")

    # ---- API helpers ----
    def submit(self, doc: Any, **kw: Any) -> tuple[int, Any, dict[str, str]]:
        return http("POST", f"{self.api}/v1/messages", doc, **kw)

    def status(self, msg_id: str, auth: str | bool | None = True) -> Any:
        code, body, _ = http("GET", f"{self.api}/v1/messages/{msg_id}", auth=auth)
        return body if code == 200 else None

    def mailbox(self, address: str, folder: str = "inbox", auth: str | bool | None = True, **q: Any) -> Any:
        from urllib.parse import urlencode

        code, body, _ = http("GET", f"{self.api}/v1/mailboxes/{address}/messages?"
                             + urlencode({"folder": folder, **q}), auth=auth)
        assert code == 200, body
        return body

    def read_topic(self, short: str, timeout: float = 5.0) -> list[tuple[bytes | None, bytes]]:
        """Every record now on a topic of this stack (all partitions, from the start)."""
        from mailflow.kafka_io import read_to_end

        return read_to_end(self.env["MAILFLOW_KAFKA_BOOTSTRAP"], f"{self.prefix}{short}",
                           idle_timeout=timeout)  # type: ignore[return-value]


class ScriptedPeer:
    """A real SMTP server (aiosmtpd on loopback) whose answers a test scripts.

    Recipients whose local part starts with ``reject`` get 550, ``defer`` get 451;
    `fail_first` answers 451 to the first k transactions; `delay` slows DATA.
    Every accepted message is kept with its envelope. It offers PIPELINING (RFC
    2920), as Postfix does, so the pipeline tests send pipelined transactions
    (mailflow.mta.pipelining); `pipelining=False` (the TLS peers' default,
    tests/testca.py) keeps the one-command-at-a-time path.
    """

    def __init__(self, fail_first: int = 0, delay: float = 0.0, code: int = 451,
                 pipelining: bool = True) -> None:
        self.port = free_port()
        self.fail_first, self.delay, self.code = fail_first, delay, code
        self.pipelining = pipelining
        self.transactions = 0
        self.messages: list[tuple[str, list[str], bytes, float]] = []
        self.attempt_times: list[float] = []
        self.controller = self._controller()
        self.listening = False

    def _controller(self) -> Any:
        from aiosmtpd.controller import Controller

        return Controller(self, hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=True,
                          decode_data=False)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: ANN001
        session.host_name = hostname
        if not self.pipelining:
            return responses
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: ANN001
        local = address.split("@")[0]
        if local.startswith("reject"):
            return f"550 5.1.1 <{address}>: no such user"
        if local.startswith("defer"):
            return f"451 4.2.1 <{address}>: mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001
        import asyncio

        self.transactions += 1
        self.attempt_times.append(time.time())
        if self.transactions <= self.fail_first:
            return f"{self.code} 4.3.0 scripted failure {self.transactions}"
        if self.delay:
            await asyncio.sleep(self.delay)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content or envelope.content, time.time()))
        return "250 2.0.0 queued by scripted peer"

    def start(self) -> ScriptedPeer:
        self.controller.start()
        self.listening = True
        return self

    def stop(self) -> None:
        if self.listening:
            self.controller.stop()
            self.listening = False

    def up(self) -> None:
        """Listen again on the same port after `stop()` (an outage ends); what arrived
        before is kept. aiosmtpd's controller closes its loop on stop: a new one."""
        self.controller = self._controller()
        self.start()

    def count_ids(self) -> dict[str, int]:
        """How many times each Message-ID arrived."""
        from collections import Counter

        return dict(Counter(self.message_ids()))

    def with_id(self, message_id: str) -> list[tuple[str, list[str], bytes, float]]:
        """The accepted messages whose Message-ID header is `message_id` (with <>)."""
        import re

        want = message_id.encode()
        return [m for m in list(self.messages)
                if (h := re.search(rb"^Message-ID:\s*(<[^>]+>)", m[2], re.I | re.M)) and h.group(1) == want]

    def message_ids(self) -> list[str]:
        import re

        out = []
        for _, _, data, _ in self.messages:
            m = re.search(rb"^Message-ID:\s*(<[^>]+>)", data, re.I | re.M)
            out.append(m.group(1).decode() if m else "")
        return out


# ---- mail through a stack: raw messages, direct submissions, the DSNs that come back ----


def raw_mail(sender: str, to: str, subject: str, message_id: str, body: str = "hello") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\n"
            f"Date: Fri, 27 Nov 2026 12:00:00 +0000\r\n\r\n{body}\r\n").encode()


def submit_raw(stack: Stack, raw: bytes) -> str:
    code, doc, _ = stack.submit(raw, ctype="message/rfc822")
    assert code == 202, doc
    return doc["id"]


def producer(stack: Stack) -> Producer:
    from confluent_kafka import Producer

    from mailflow.kafka_io import producer_config

    return Producer(producer_config(stack.env["MAILFLOW_KAFKA_BOOTSTRAP"], **{"linger.ms": 5}))


def produce_submission(p: Producer, stack: Stack, sender: str, rcpts: list[str], raw: bytes,
                       msg_id: str) -> None:
    """Straight onto ``submissions`` (what an upstream service may do), skipping HTTP."""
    from schemas.records import Message

    msg = Message(id=msg_id, sender=sender, recipients=rcpts, received_at=time.time(),
                  size=len(raw), body=raw, source="kafka")
    p.produce(f"{stack.prefix}submissions", key=sender.encode(), value=msg.to_json())


def inbox_raw(stack: Stack, address: str) -> list[bytes]:
    """Every message in `address`'s inbox, as RFC 5322 bytes."""
    out = []
    for m in stack.mailbox(address, "inbox", limit=100)["messages"]:
        code, raw, _ = http("GET", f"{stack.api}/v1/mailboxes/{address}/messages/{m['id']}/raw")
        assert code == 200, raw
        out.append(raw)
    return out


def find_dsn(stack: Stack, address: str, original_mid: str, timeout: float = 60) -> EmailMessage:
    """The bounce about `original_mid` in `address`'s inbox, parsed."""
    def look() -> EmailMessage | None:
        for raw in inbox_raw(stack, address):
            msg = email.message_from_bytes(raw, policy=policy.default)
            if msg.get("In-Reply-To", "").strip() == original_mid:
                return msg
        return None
    return wait_for(look, timeout, interval=0.5, what=f"DSN about {original_mid} in {address}'s inbox")


def dsn_report(dsn: EmailMessage) -> tuple[list[EmailMessage], str]:
    """(per-recipient blocks of the delivery-status part, the returned headers text)."""
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    parts = dsn.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    blocks = parts[1].get_payload()
    assert blocks and "Reporting-MTA" in blocks[0]
    returned = parts[2].get_payload(decode=True).decode()
    return blocks[1:], returned


def topic_json(stack: Stack, short: str) -> list[dict[str, Any]]:
    return [orjson.loads(v) for _, v in stack.read_topic(short, timeout=10) if v]


def timeline(stack: Stack, msg_id: str, state: str) -> list[dict[str, Any]]:
    return [e for e in stack.status(msg_id)["timeline"] if e["state"] == state]
