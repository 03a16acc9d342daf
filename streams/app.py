"""One Faust app per stage, so each stage is its own consumer group.

The app id is ``<topic prefix><stage>`` (``mailflow.deliver``...): its committed
offsets on the stage's input topic are that stage's queue, and `mailflow lag`
reads them. Replicas of a stage share the app id and split its partitions.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust

from mailflow.config import Settings
from streams import faust_compat
from streams.topics import full_name, group_id, topic_specs

STAGES = ("ratelimit", "validate", "store", "scan", "sentfolder", "deliver", "retry", "status",
          "webhooks")

# Each stage's input topic: what its consumer lag measures.
STAGE_INPUT = {
    "ratelimit": "submissions",
    "validate": "admitted",
    "store": "local",
    "scan": "outgoing",
    "sentfolder": "clean",
    "deliver": "delivery",
    "retry": "retry.*",
    "status": "events",
    "webhooks": "events",  # its own group: a slow receiver is this stage's lag
}


def input_topics(settings: Settings, stage: str) -> list[str]:
    """The full names of `stage`'s input topics (every retry tier for ``retry.*``)."""
    short = STAGE_INPUT[stage]
    if short.endswith("*"):
        prefix = short[:-1]
        return [full_name(settings, s.name) for s in topic_specs(settings) if s.name.startswith(prefix)]
    return [full_name(settings, short)]


@dataclass
class Replica:
    """Where one replica of a stage keeps its state and serves its web views."""

    index: int
    datadir: Path
    web_port: int
    lock_fd: int  # held for the life of the process: replicas pick distinct dirs
    port_fd: int  # likewise for the web port


def claim_replica(settings: Settings, stage: str, first_port: int = 6066) -> Replica:
    """Pick the first free replica slot of `stage` on this machine.

    The slot's data dir is locked with flock, so two replicas started side by side
    never share RocksDB files, and the web port is the first free one from 6066 up.
    """
    base = settings.data_dir / "stages" / stage
    base.mkdir(parents=True, exist_ok=True)
    for index in range(64):
        datadir = base / f"r{index}"
        datadir.mkdir(exist_ok=True)
        fd = os.open(datadir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        port, port_fd = claim_port(settings, first_port)
        return Replica(index, datadir, port, fd, port_fd)
    raise RuntimeError(f"no free replica slot for stage {stage} under {base}")


CLEAN_MARK = ".clean-shutdown"


def reset_tables_after_crash(datadir: Path, tabledir: Path) -> bool:
    """Drop local table state unless the last run of this replica stopped cleanly.

    Faust writes a table's local RocksDB at once but its changelog only when the
    producer sends, so a worker killed mid-batch leaves local state ahead of the
    changelog; on restart Faust replays the changelog's tail over it, and keys end
    up from different moments (a folder count newer than its page). Restoring the
    whole table from the changelog gives a prefix of the writes, which a replay of
    the uncommitted input repairs. Kafka Streams does the same after an unclean
    exit. Returns True if state was dropped.
    """
    mark = datadir / CLEAN_MARK
    clean = mark.exists()
    mark.unlink(missing_ok=True)  # a crash from now on must find it missing
    if clean or not tabledir.exists():
        return False
    shutil.rmtree(tabledir)
    return True


def mark_clean_shutdown(datadir: Path) -> None:
    (datadir / CLEAN_MARK).touch()


def claim_port(settings: Settings, start: int) -> tuple[int, int]:
    """The first port from `start` that is free and not claimed by a sibling process.

    Workers starting side by side would all see the same port free; a flock per
    port under the data dir makes the choice exclusive until this process exits.
    """
    # Machine-wide, not per data dir: stacks with different data dirs share the ports.
    locks = Path(tempfile.gettempdir()) / "mailflow-ports"
    locks.mkdir(parents=True, exist_ok=True)
    for port in range(start, start + 1000):
        fd = os.open(locks / f"{port}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        with socket.socket() as s:
            try:
                s.bind((settings.api_host, port))
            except OSError:
                os.close(fd)
                continue
        return port, fd
    raise RuntimeError(f"no free port from {start}")


def make_app(stage: str, settings: Settings, replica: Replica) -> faust.App:
    """The Faust app of one replica of `stage`, with mailflow's Faust patches
    installed in this process first (`streams.faust_compat`: a stage is only safe
    with them, and a Faust they do not fit stops it here)."""
    faust_compat.install()
    url = f"http://{settings.web_advertise_host}:{replica.web_port}"
    app = faust.App(
        group_id(settings, stage),
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="rocksdb://",  # faust uses rocksdict when python-rocksdb is absent
        datadir=str(replica.datadir),
        web_host=settings.api_host,
        web_bind=settings.api_host,
        web_port=replica.web_port,
        canonical_url=url,
        web_in_thread=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication,
        topic_allow_declare=True,
        producer_acks=-1,
        producer_linger_ms=1,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        broker_commit_every=500,
        broker_commit_interval=0.5,
        stream_buffer_maxsize=4096,
        table_standby_replicas=0,
        # A replica killed with SIGKILL holds its partitions until its session times
        # out; Faust's 60 s default would stop that share of the mail for a minute.
        # 15 s with heartbeats every 3 s: failover in seconds, yet a busy 2-core
        # machine does not lose members to a late heartbeat.
        broker_session_timeout=15.0,
        broker_heartbeat_interval=3.0,
        logging_config=None,
        Monitor=faust_compat.StageMonitor,  # no per-record statistics nobody reads
    )
    holes: dict[Any, Any] = {}

    @app.timer(1.0)
    async def check_holes() -> None:
        await faust_compat.refetch_holes(app, holes, time.monotonic())

    return app


def topic(app: faust.App, settings: Settings, short: str, **kw: Any) -> faust.TopicT:
    """A raw-bytes topic of the graph by its short name."""
    return app.topic(full_name(settings, short), schema=faust_compat.RawSchema(), **kw)


def internal_topics(app: faust.App) -> list[tuple[str, int, dict[str, str]]]:
    """The topics Faust would create lazily for `app`: each table's changelog and
    the assignor's leader topic, as (name, partitions, config) for `ensure_topics`.

    Created up front, with the graph: on a freshly started broker a changelog that
    Faust creates itself at start can stay missing from its consumer's metadata,
    and the stage then retries forever on PartitionsMismatch.
    """
    out: list[tuple[str, int, dict[str, str]]] = []
    for table in app.tables.values():
        t = table.changelog_topic
        config: dict[str, str] = {}
        flags = [f for f, on in (("compact", t.compacting), ("delete", t.deleting)) if on]
        if flags:
            config["cleanup.policy"] = ",".join(flags)
        if t.retention:
            config["retention.ms"] = str(int(float(t.retention) * 1000))
        out.append((t.get_topic_name(), t.partitions or app.conf.topic_partitions, config))
    out.append((f"{app.conf.id}-__assignor-__leader", 1, {}))
    return out
