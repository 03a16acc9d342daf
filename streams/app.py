"""One Faust app per stage, so each stage is its own consumer group.

The app id is ``<topic prefix><stage>`` (``mailflow.deliver``...): its committed
offsets on the stage's input topic are that stage's queue, and `mailflow lag`
reads them. Replicas of a stage share the app id and split its partitions.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
from faust.transport.consumer import Consumer, ensure_TP
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.producer import ProducerBuffer

from mailflow.config import Settings
from streams.topics import full_name, topic_specs

# Table writes queue their changelog records in Faust's ProducerBuffer; past 100
# pending records Faust pauses every stream until the buffer drains one record at
# a time (with 0.1 s waits), which caps a stage far below what Kafka takes. A
# larger bound keeps the back-pressure and removes the stall.
ProducerBuffer.max_messages = 10_000


class _NoReadOffsets(MutableMapping[Any, Any]):
    """Stands in for Faust's per-partition "read offset", which it uses to drop any
    fetched record below the highest offset it has seen, and to call a jump a "gap"
    whose offsets count as acknowledged.

    After a rebalance Faust resumes fetching a stream partition before it seeks it
    back to the committed offset (faust-streaming #221, #606). Records fetched early
    raise the read offset; the queue they sat in is cleared; the re-fetch after the
    seek is then dropped as old. A CI run's store skipped 103 records that way and
    its commit stopped for good; a chaos run's deliver stage had the offsets of a
    skipped record counted as a gap and committed past it: mail lost. Without read
    offsets nothing is dropped and nothing is assumed: a record fetched twice is
    handled twice, which every stage is idempotent for, and Faust's ack still
    ignores offsets below the committed one.
    """

    def __getitem__(self, tp: Any) -> None:
        return None

    def __setitem__(self, tp: Any, offset: Any) -> None:
        pass

    def __delitem__(self, tp: Any) -> None:
        pass

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __len__(self) -> int:
        return 0


_consumer_init = Consumer.__init__


def _init_without_read_offsets(self: Any, *args: Any, **kwargs: Any) -> None:
    _consumer_init(self, *args, **kwargs)
    self._read_offset = _NoReadOffsets()


Consumer.__init__ = _init_without_read_offsets

# Faust commits the first run of consecutive acknowledged offsets with a check that
# is one short: with C committed (the next offset to read) it commits past C while
# the record at C is still being handled, as soon as C+1 is done; and with no
# committed offset (a fresh group, or one committed at 0, which Faust reads as none)
# it does not check at all. A stage with records in flight out of order (deliver's
# 32 actors) that is killed then never handles the record it committed past: mail
# lost. A commit here starts exactly at the partition's committed offset.
_faust_new_offset = Consumer._new_offset


def commit_base(consumer: Any, tp: Any) -> int | None:
    """The offset a commit of `tp` must start from: the committed one, 0 included."""
    base = consumer._committed_offset[tp]
    return base if base is not None else getattr(consumer, "_seek_base", {}).get(tp)


def _new_offset_from_base(self: Any, tp: Any) -> int | None:
    acked = self._acked[tp]
    base = commit_base(self, tp)
    if acked and base is not None and min(acked) > base:
        return None  # the record at `base` is not done (or was dropped: see `refetch_holes`)
    return _faust_new_offset(self, tp)


async def _perform_seek_keeping_base(self: Any) -> None:
    # Faust keeps the committed offsets but turns 0 into None; keep them exactly.
    offsets = await self.seek_to_committed()
    self._seek_base = {ensure_TP(tp): off for tp, off in offsets.items() if off is not None and off >= 0}
    self._committed_offset.update({tp: off or None for tp, off in self._seek_base.items()})


Consumer._new_offset = _new_offset_from_base
Consumer.perform_seek = _perform_seek_keeping_base

# Records Faust fetched and then dropped without handling: its fetch loop discards
# the rest of a fetched batch when flow control pauses or the generation changes, and
# records fetched while a partition is not yet active, trusting a later seek to read
# them again. Right after a table's recovery some were not read again: a status stage
# started over a backlog with its changelog to restore handled the first 5 records of
# each partition, never saw the next 37, and handled everything after; its commit
# stayed at 5 for good (nothing lost, since the commit cannot pass them, but the
# stage's lag never fell and every restart handled it all again). A partition whose
# acknowledged offsets start past its commit base, with no record below them fetched
# and unacknowledged, for HOLE_GRACE seconds, is sought back to the base and read again
# (every stage is idempotent for a record handled twice).
HOLE_GRACE = 5.0


def hole_start(base: int | None, acked: list[int], in_flight: list[int]) -> int | None:
    """Where a partition must be read again from, or None: its lowest acked offset is
    past `base` and no record in between is in flight (fetched, not yet acked)."""
    if base is None or not acked:
        return None
    first_acked = min(acked)
    if first_acked <= base or any(base <= off < first_acked for off in in_flight):
        return None
    return base


async def refetch_holes(app: faust.App, seen: dict[Any, float], now: float) -> list[tuple[Any, int]]:
    """One check of every partition for records fetched and dropped (see HOLE_GRACE);
    seeks those whose hole lasted the grace period. Returns the (tp, offset) sought."""
    consumer = app.consumer
    if app.rebalancing or not consumer.flow_active:
        seen.clear()
        return []
    in_flight: dict[Any, list[int]] = {}
    for m in list(consumer._unacked_messages):
        if not m.acked:
            in_flight.setdefault(m.tp, []).append(m.offset)
    sought = []
    for tp, acked in list(consumer._acked.items()):
        start = hole_start(commit_base(consumer, tp), list(acked), in_flight.get(tp, []))
        if start is None:
            seen.pop(tp, None)
        elif now - seen.setdefault(tp, now) >= HOLE_GRACE:
            logging.getLogger("mailflow.stage").warning(
                "%s: records %d to %d were fetched but never handled; reading from %d again",
                tp, start, min(acked) - 1, start)
            await consumer.seek(tp, start)
            seen.pop(tp, None)
            sought.append((tp, start))
    return sought


# An offset commit that never returns stops a stage for good, with nothing but a
# Faust log line after five minutes ("Has not committed TP"): a five-minute chaos run's
# scan stage sent a commit as the broker was killed and waited on it for the rest
# of the run while every other stage went on. A replica whose commit has not
# returned after COMMIT_STUCK seconds exits, as if killed; its supervisor (`mailflow
# up`, an orchestrator, bench/chaos) starts it again and it resumes from its last
# commit like after any crash, handling a few records twice (every stage is
# idempotent). Commits wait out a broker restart (15 s in the chaos runs); a broker
# away for longer makes replicas restart until it is back.
COMMIT_STUCK = 120.0
_thread_commit = AIOKafkaConsumerThread.commit


async def _commit_or_exit(self: Any, offsets: Any) -> Any:
    try:
        return await asyncio.wait_for(_thread_commit(self, offsets), COMMIT_STUCK)
    except TimeoutError:
        logging.getLogger("mailflow.stage").critical(
            "offset commit has not returned in %.0f s; exiting so that this replica is "
            "started again", COMMIT_STUCK)  # a stream handler flushes each record
        os._exit(75)  # EX_TEMPFAIL; no clean shutdown: it would wait on the same commit


AIOKafkaConsumerThread.commit = _commit_or_exit

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
    url = f"http://{settings.web_advertise_host}:{replica.web_port}"
    app = faust.App(
        f"{settings.topic_prefix}{stage}",
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
    )
    holes: dict[Any, float] = {}

    @app.timer(1.0)
    async def check_holes() -> None:
        await refetch_holes(app, holes, time.monotonic())

    return app


def topic(app: faust.App, settings: Settings, short: str, **kw: object) -> faust.TopicT:
    """A raw-bytes topic of the graph by its short name."""
    return app.topic(
        full_name(settings, short), key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw", **kw,
    )


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
