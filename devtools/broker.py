"""The embedded Apache Kafka broker: one KRaft node, broker and controller in one,
or a local cluster of several such nodes (``mailflow broker --nodes 3``).

Its jars come from Maven Central through ``broker/pom.xml`` (kafka_2.13 plus the
log4j2 backend the Apache tarball ships), copied once into a cache keyed by the
POM's hash. The first start formats the storage (``StorageTool format
--standalone``); later starts reuse it, so topics and offsets survive restarts.
Readiness is a real metadata request, not a sleep.

A cluster of N nodes runs every node with both roles and the N controllers as a
static voter set (``controller.quorum.voters``), so any majority elects the
active controller. Node k (1-based) listens on ``port + 2(k-1)`` for clients and
``controller_port + 2(k-1)`` for the quorum: with the defaults 9092/9093, 9094/9095,
9096/9097. Each keeps its log under ``DATA_DIR/kafka-cluster/node<k>``, all formatted
with one cluster id. Internal topics are replicated min(3, N) times with
``min.insync.replicas`` min(2, N), and a broker that stops heartbeating is fenced
(its partitions led elsewhere) after ``BROKER_SESSION_MS``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# cluster_bootstrap, the clients' side of cluster_nodes, lives with the settings
# (the default bootstrap of a cluster); here for the callers of this module.
from mailflow.config import cluster_bootstrap as cluster_bootstrap
from mailflow.config import node_port
from mailflow.kafka_ready import is_ready as is_ready
from mailflow.kafka_ready import quiet_admin
from mailflow.ops.supervise import die_with_parent

ROOT = Path(__file__).resolve().parents[1]
POM = ROOT / "broker" / "pom.xml"

LOG4J2 = """\
status = warn
appender.console.type = Console
appender.console.name = STDERR
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.stderr.ref = STDERR
logger.kafka.name = kafka
logger.kafka.level = {level}
logger.state.name = state.change.logger
logger.state.level = warn
"""


class BrokerError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("MAILFLOW_CACHE_DIR", Path.home() / ".cache" / "mailflow"))


def libs_dir() -> Path:
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    return cache_dir() / f"kafka-libs-{digest}"


def require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise BrokerError(f"{tool} not found: the embedded Kafka broker needs it "
                          f"(Debian: apt-get install {package})")
    return path


def ensure_jars(log=print) -> Path:
    """The broker's class path directory, fetched through Maven on first use."""
    libs = libs_dir()
    if (libs / ".complete").exists():
        return libs
    if not POM.exists():
        raise BrokerError(f"{POM} is missing: run mailflow from its source checkout")
    mvn = require("mvn", "maven")
    require("java", "openjdk-17-jre-headless")
    tmp = libs.with_name(libs.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"fetching the Kafka broker's jars through Maven into {libs} (once)")
    result = subprocess.run(
        [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
         "-DincludeScope=runtime", f"-DoutputDirectory={tmp}"],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise BrokerError(f"Maven could not fetch the broker's jars:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    (tmp / ".complete").write_text(time.ctime())
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    return libs


# A killed broker's partitions stay without a leader until the controller fences it
# for missed heartbeats, and writes to them wait that long (Kafka's default: 9 s).
# 6 s with heartbeats every second fails over faster, and still leaves a
# 2-core machine under load six missed beats before a live broker is fenced.
BROKER_SESSION_MS = 6000
BROKER_HEARTBEAT_MS = 1000


@dataclass(frozen=True)
class Node:
    """One KRaft node of a local cluster (ids from 1)."""

    node_id: int
    port: int
    controller_port: int
    host: str = "127.0.0.1"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def voter(self) -> str:
        return f"{self.node_id}@{self.host}:{self.controller_port}"


def cluster_nodes(nodes: int, port: int = 9092, controller_port: int | None = None,
                  host: str = "127.0.0.1") -> list[Node]:
    """The nodes of an N-node local cluster: node k on ``port + 2(k-1)`` and
    ``controller_port + 2(k-1)`` (controller_port defaults to port + 1)."""
    if nodes < 1:
        raise ValueError("a cluster has at least one node")
    cport = port + 1 if controller_port is None else controller_port
    return [Node(k, node_port(port, k), node_port(cport, k), host) for k in range(1, nodes + 1)]


def server_properties(log_dir: Path, port: int, controller_port: int, host: str = "127.0.0.1",
                      node: Node | None = None, voters: list[Node] | None = None) -> str:
    """A node's server.properties: the single node (``voters`` None), or `node` of
    the cluster whose controllers are `voters`."""
    if voters is None:
        node_id, quorum = 1, f"controller.quorum.bootstrap.servers={host}:{controller_port}"
        replicas, min_isr, session = 1, 1, ""
    else:
        assert node is not None
        node_id = node.node_id
        quorum = "controller.quorum.voters=" + ",".join(v.voter for v in voters)
        replicas, min_isr = min(3, len(voters)), min(2, len(voters))
        # Cluster-wide defaults, so that a topic created without settings (a client's
        # auto-created one) is as safe as the graph's; and leadership moved back to
        # a restarted node within half a minute rather than five.
        session = (f"default.replication.factor={replicas}\n"
                   f"min.insync.replicas={min_isr}\n"
                   f"broker.session.timeout.ms={BROKER_SESSION_MS}\n"
                   f"broker.heartbeat.interval.ms={BROKER_HEARTBEAT_MS}\n"
                   "leader.imbalance.check.interval.seconds=30\n"
                   "unclean.leader.election.enable=false\n")
    return f"""\
process.roles=broker,controller
node.id={node_id}
{quorum}
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={log_dir}
num.partitions=4
offsets.topic.replication.factor={replicas}
offsets.topic.num.partitions=8
transaction.state.log.replication.factor={replicas}
transaction.state.log.min.isr={min_isr}
share.coordinator.state.topic.replication.factor={replicas}
share.coordinator.state.topic.min.isr={min_isr}
{session}group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
log.retention.hours=168
log.segment.bytes=268435456
"""


def java_cmd(libs: Path, main: str, *args: str, heap: str = "1g", log4j: Path | None = None) -> list[str]:
    cmd = [require("java", "openjdk-17-jre-headless"), f"-Xmx{heap}", "-Xms128m", "-XX:+UseG1GC",
           "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true"]
    if log4j:
        cmd.append(f"-Dlog4j2.configurationFile={log4j}")
    return [*cmd, "-cp", f"{libs}/*", main, *args]


def _format(libs: Path, props: Path, log4j: Path, cluster_id: str, *flags: str) -> None:
    fmt = subprocess.run(
        java_cmd(libs, "kafka.tools.StorageTool", "format", *flags, "-t", cluster_id,
                 "-c", str(props), log4j=log4j),
        capture_output=True, text=True,
    )
    if fmt.returncode != 0:
        raise BrokerError(f"formatting Kafka storage failed:\n{fmt.stdout}{fmt.stderr}")


def _random_uuid(libs: Path, log4j: Path) -> str:
    return subprocess.run(java_cmd(libs, "kafka.tools.StorageTool", "random-uuid", log4j=log4j),
                          capture_output=True, text=True, check=True).stdout.strip()


def prepare(data_dir: Path, port: int = 9092, controller_port: int = 9093,
            loglevel: str = "warn", log=print, heap: str = "1g") -> list[str]:
    """Write config, format storage on first start; return the broker's command."""
    libs = ensure_jars(log)
    home = data_dir / "kafka"
    log_dir = home / "data"
    home.mkdir(parents=True, exist_ok=True)
    props = home / "server.properties"
    props.write_text(server_properties(log_dir, port, controller_port))
    log4j = home / "log4j2.properties"
    log4j.write_text(LOG4J2.format(level=loglevel))
    if not (log_dir / "meta.properties").exists():
        cluster_id = _random_uuid(libs, log4j)
        _format(libs, props, log4j, cluster_id, "--standalone")
        log(f"formatted Kafka storage in {log_dir} (cluster {cluster_id})")
    return java_cmd(libs, "kafka.Kafka", str(props), log4j=log4j, heap=heap)


def cluster_home(data_dir: Path) -> Path:
    return data_dir / "kafka-cluster"


def prepare_node(data_dir: Path, node: Node, voters: list[Node], loglevel: str = "warn",
                 log=print, heap: str = "512m") -> list[str]:
    """Like `prepare`, for one node of the cluster of `voters`: its own config and
    log dir under ``DATA_DIR/kafka-cluster/node<k>``, formatted on first start with
    the cluster's id (made once, kept in ``cluster.id`` beside the nodes)."""
    top = cluster_home(data_dir)
    quorum = ",".join(v.voter for v in voters)
    # The voters are fixed when the storage is formatted: a different set (another
    # node count or ports) on the same storage would never form a quorum.
    made = top / "voters"
    if made.exists() and made.read_text().strip() != quorum:
        raise BrokerError(f"{top} holds a cluster of voters {made.read_text().strip()}, not {quorum}: "
                          "use the same --nodes and ports, or another data dir")
    libs = ensure_jars(log)
    home = top / f"node{node.node_id}"
    log_dir = home / "data"
    home.mkdir(parents=True, exist_ok=True)
    props = home / "server.properties"
    props.write_text(server_properties(log_dir, node.port, node.controller_port, node.host,
                                       node=node, voters=voters))
    log4j = home / "log4j2.properties"
    log4j.write_text(LOG4J2.format(level=loglevel))
    if not (log_dir / "meta.properties").exists():
        id_file = top / "cluster.id"
        try:  # the first node to get here makes the id; the others read it
            fd = os.open(id_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(_random_uuid(libs, log4j))
            made.write_text(quorum)
        except FileExistsError:
            pass
        cluster_id = ""
        deadline = time.monotonic() + 60
        while not cluster_id:  # written by a sibling just now: wait for its content
            cluster_id = id_file.read_text().strip()
            if not cluster_id and time.monotonic() > deadline:
                raise BrokerError(f"{id_file} stayed empty")
            time.sleep(0.1)
        _format(libs, props, log4j, cluster_id)
        log(f"formatted node {node.node_id}'s Kafka storage in {log_dir} (cluster {cluster_id})")
    return java_cmd(libs, "kafka.Kafka", str(props), log4j=log4j, heap=heap)


def supervise_cluster(sup: Any, me: list[str], bootstrap: str, nodes: int) -> None:
    """Add each node of the local cluster to `sup` (a `mailflow.ops.supervise.Supervisor`)
    as its own ``mailflow broker --nodes N --node K``, restarted if it dies, so one
    node's crash is what it is in production: a failover, not an outage. Node 1's
    port is the first address of `bootstrap`. Nodes that already answer are left
    alone (a cluster started by hand). The last one added waits until all are
    registered: none is ready before a majority of controllers is up."""
    first = bootstrap.split(",")[0]
    host, _, port = first.rpartition(":")
    members = cluster_nodes(nodes, int(port), host=host or "127.0.0.1")
    todo = [n for n in members if not is_ready(n.bootstrap, timeout=1.0)]
    for n in todo:
        last = n is todo[-1]
        sup.add(f"kafka node {n.node_id}", [*me, "broker", "--nodes", str(nodes), "--node", str(n.node_id),
                                            "--port", port], restart=True,
                ready=(lambda: cluster_ready(bootstrap, nodes)) if last else None, stops_last=True)


def cluster_ready(bootstrap: str, nodes: int, timeout: float = 2.0) -> bool:
    """A metadata request answered with all `nodes` brokers registered."""
    from confluent_kafka.admin import AdminClient

    try:
        md = AdminClient(quiet_admin(bootstrap)).list_topics(timeout=timeout)
        return len(md.brokers) >= nodes
    except Exception:
        return False


def wait_ready(bootstrap: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 120.0,
               nodes: int = 1) -> None:
    deadline = time.monotonic() + timeout
    while not cluster_ready(bootstrap, nodes):
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"the Kafka broker exited with {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise BrokerError(f"the Kafka broker at {bootstrap} was not ready after {timeout:.0f}s")
        time.sleep(0.25)


def run(data_dir: Path, port: int = 9092, controller_port: int | None = None, loglevel: str = "warn",
        nodes: int = 1, only: int | None = None, heap: str | None = None) -> int:
    """`mailflow broker`: run in the foreground until SIGINT/SIGTERM.

    One node by default; `nodes` > 1 runs a local cluster of that many (all of them,
    or only node `only`, for a supervisor that runs and restarts each on its own).
    """
    def log(m: str) -> None:
        print(f"mailflow broker: {m}", file=sys.stderr, flush=True)

    cport = port + 1 if controller_port is None else controller_port
    if nodes == 1 and only is None:
        mine = [Node(1, port, cport)]
    else:
        voters = cluster_nodes(nodes, port, cport)
        if only is not None and not 1 <= only <= nodes:
            log(f"--node must be between 1 and {nodes}")
            return 2
        mine = [n for n in voters if only is None or n.node_id == only]
    for n in mine:
        if is_ready(n.bootstrap, timeout=1.0):
            # Otherwise our JVM would fail to bind and the readiness check would be
            # answered by the other broker.
            log(f"a Kafka broker already answers on {n.bootstrap}; not starting another")
            return 3
    try:
        if nodes == 1 and only is None:
            cmds = [prepare(data_dir, port, cport, loglevel, log, heap=heap or "1g")]
        else:
            cmds = [prepare_node(data_dir, n, voters, loglevel, log, heap=heap or "512m") for n in mine]
    except BrokerError as exc:
        log(str(exc))
        return 2
    # Each JVM stops (cleanly, on SIGTERM) when this process ends, however it ends.
    procs = [subprocess.Popen(cmd, preexec_fn=die_with_parent(signal.SIGTERM)) for cmd in cmds]
    stop = {"sig": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["sig"] = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # Kafka shuts down cleanly on SIGTERM

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for n, proc in zip(mine, procs, strict=True):
            # A lone node of a cluster answers once a quorum of its peers is up.
            wait_ready(n.bootstrap, proc, timeout=180.0, nodes=len(mine) if only is None else 1)
        where = ", ".join(f"{n.bootstrap} (controller {n.controller_port})" for n in mine)
        home = data_dir / "kafka" if nodes == 1 and only is None else cluster_home(data_dir)
        log(f"ready on {where}, data in {home}")
    except BrokerError as exc:
        if not stop["sig"]:
            log(str(exc))
            on_signal(signal.SIGTERM, None)
    try:
        # The first node to exit ends the run, the others stopped with it: a partial
        # cluster behind a live `mailflow broker` would hide the fault.
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        on_signal(signal.SIGTERM, None)
        return max(p.wait() for p in procs)
    except KeyboardInterrupt:
        return max(p.wait() for p in procs)
