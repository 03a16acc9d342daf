"""The embedded Apache Kafka broker: one KRaft node, broker and controller in one.

Its jars come from Maven Central through ``broker/pom.xml`` (kafka_2.13 plus the
log4j2 backend the Apache tarball ships), copied once into a cache keyed by the
POM's hash. The first start formats the storage (``StorageTool format
--standalone``); later starts reuse it, so topics and offsets survive restarts.
Readiness is a real metadata request, not a sleep.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from mailflow.supervise import die_with_parent

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


def server_properties(log_dir: Path, port: int, controller_port: int, host: str = "127.0.0.1") -> str:
    return f"""\
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers={host}:{controller_port}
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={log_dir}
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
log.retention.hours=168
log.segment.bytes=268435456
"""


def java_cmd(libs: Path, main: str, *args: str, heap: str = "1g", log4j: Path | None = None) -> list[str]:
    cmd = [require("java", "openjdk-17-jre-headless"), f"-Xmx{heap}", "-Xms256m", "-XX:+UseG1GC",
           "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true"]
    if log4j:
        cmd.append(f"-Dlog4j2.configurationFile={log4j}")
    return [*cmd, "-cp", f"{libs}/*", main, *args]


def prepare(data_dir: Path, port: int = 9092, controller_port: int = 9093,
            loglevel: str = "warn", log=print) -> list[str]:
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
        cluster_id = subprocess.run(java_cmd(libs, "kafka.tools.StorageTool", "random-uuid", log4j=log4j),
                                    capture_output=True, text=True, check=True).stdout.strip()
        fmt = subprocess.run(
            java_cmd(libs, "kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id,
                     "-c", str(props), log4j=log4j),
            capture_output=True, text=True,
        )
        if fmt.returncode != 0:
            raise BrokerError(f"formatting Kafka storage failed:\n{fmt.stdout}{fmt.stderr}")
        log(f"formatted Kafka storage in {log_dir} (cluster {cluster_id})")
    return java_cmd(libs, "kafka.Kafka", str(props), log4j=log4j)


def is_ready(bootstrap: str, timeout: float = 2.0) -> bool:
    """A metadata request answered with at least one broker."""
    from confluent_kafka.admin import AdminClient

    try:
        md = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0,
                          "logger": _Quiet()}).list_topics(timeout=timeout)
        return bool(md.brokers)
    except Exception:
        return False


class _Quiet:
    """A logger for librdkafka that drops the 'connection refused' noise while waiting."""

    def log(self, *args: object, **kw: object) -> None:
        pass

    def __getattr__(self, name: str):
        return self.log


def wait_ready(bootstrap: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not is_ready(bootstrap):
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"the Kafka broker exited with {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise BrokerError(f"the Kafka broker at {bootstrap} was not ready after {timeout:.0f}s")
        time.sleep(0.25)


def run(data_dir: Path, port: int = 9092, controller_port: int = 9093, loglevel: str = "warn") -> int:
    """`mailflow broker`: run in the foreground until SIGINT/SIGTERM."""
    def log(m: str) -> None:
        print(f"mailflow broker: {m}", file=sys.stderr, flush=True)

    if is_ready(f"127.0.0.1:{port}", timeout=1.0):
        # Otherwise our JVM would fail to bind and the readiness check would be
        # answered by the other broker.
        log(f"a Kafka broker already answers on 127.0.0.1:{port}; not starting another")
        return 3
    try:
        cmd = prepare(data_dir, port, controller_port, loglevel, log)
    except BrokerError as exc:
        log(str(exc))
        return 2
    # The JVM stops (cleanly, on SIGTERM) when this process ends, however it ends.
    proc = subprocess.Popen(cmd, preexec_fn=die_with_parent(signal.SIGTERM))
    stop = {"sig": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["sig"] = True
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # Kafka shuts down cleanly on SIGTERM

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        wait_ready(f"127.0.0.1:{port}", proc)
        log(f"ready on 127.0.0.1:{port} (controller {controller_port}), data in {data_dir / 'kafka'}")
    except BrokerError as exc:
        if not stop["sig"]:
            log(str(exc))
            proc.terminate()
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return proc.wait()
