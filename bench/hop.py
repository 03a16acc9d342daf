"""The cost of one no-op hop: read a record, write it to another topic, commit.

Usage (a broker must be running, e.g. ``mailflow broker``)::

    python bench/hop.py                               # 50,000 records, 3 runs, 3 modes
    python bench/hop.py --modes stage,stage-each      # the runtime's two agent modes
    python bench/hop.py --count 20000 --runs 5 --modes librdkafka,stage

The same hop several ways, each in its own process so that its CPU is its own:

``librdkafka``
    confluent-kafka alone: ``Consumer.consume(500)``, ``Producer.produce`` for each
    record, ``flush`` (acks=all), then a synchronous commit of the batch.
``aiokafka``
    aiokafka's ``getmany`` (up to 500 records) with mailflow's librdkafka producer
    (`mailflow.kafka_io.AsyncProducer`), waiting for every ack, then a commit.
``stage``
    a stage on mailflow's runtime: a Faust app made by `streams.app.make_app`, its
    agent running `streams.runtime.Stage.run_batches` with a handler that returns
    the record as its one output (`Outputs.send`), offsets committed by Faust.
``stage-each``
    the same stage in the runtime's ``each`` mode, 32 actors over Faust's own
    stream, as the deliver and scan stages run.

``--count`` records of ``--size`` bytes are written once to an input topic; each
run reads all of them with a fresh consumer group and writes each to an output
topic. Each run is timed from its first record to its last commit: CPU ms per
record is the process's CPU (``time.process_time``, every thread) over that span
divided by the records, and records/s is the records over its wall time. Start-up
(connecting, joining the group) is left out. Modes are alternated in every run;
figures are medians over ``--runs``. The topics (prefix ``--prefix``) are deleted
at the end. The last line of the output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODES = ("librdkafka", "aiokafka", "stage", "stage-each")
DEFAULT_MODES = ("librdkafka", "aiokafka", "stage")  # the hop, three ways
# The runtime's agent mode of each stage mode (`streams.runtime.Stage.agent`): batches
# (most stages), each with 32 actors (deliver and scan).
STAGE_MODES = {"stage": ("batches", 1), "stage-each": ("each", 32)}
BATCH = 500  # records per consume/getmany in the bare loops
RESULT_TAG = "HOP-RESULT "  # a child's line with its figures
BASELINE = "stage@baseline"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=50_000, help="records per run (default 50,000)")
    p.add_argument("--size", type=int, default=4096, help="bytes per record value (default 4096)")
    p.add_argument("--runs", type=int, default=3, help="runs of every mode (default 3)")
    p.add_argument("--modes", type=_modes, default=list(DEFAULT_MODES),
                   help=f"comma-separated, from {','.join(MODES)} (default {','.join(DEFAULT_MODES)})")
    p.add_argument("--partitions", type=int, default=4, help="partitions per topic (default 4)")
    p.add_argument("--bootstrap", default=os.environ.get("MAILFLOW_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    p.add_argument("--prefix", default=f"hop-{uuid.uuid4().hex[:8]}.",
                   help="topic prefix of this run's topics (default a fresh one)")
    p.add_argument("--baseline", metavar="DIR",
                   help="also run the stage mode on the mailflow checkout in DIR (as mode "
                        "'stage@baseline'), alternated with this one: an A/B of the runtime")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--group", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.count < 1 or args.runs < 1 or args.size < 1:
        p.error("--count, --runs and --size must be positive")
    return args


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(MODES)}")
    return modes


def figures(count: int, cpu_s: float, wall_s: float) -> dict[str, float]:
    """One run's figures: CPU ms per record and records/s."""
    return {"cpu_ms_per_record": round(cpu_s * 1000 / count, 4),
            "records_per_s": round(count / wall_s, 1) if wall_s > 0 else 0.0,
            "cpu_s": round(cpu_s, 3), "wall_s": round(wall_s, 3)}


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per mode: the median CPU ms per record and records/s, with every run's value."""
    out: dict[str, dict[str, Any]] = {}
    for mode, results in runs.items():
        if not results:
            continue
        cpu = [r["cpu_ms_per_record"] for r in results]
        rate = [r["records_per_s"] for r in results]
        out[mode] = {"cpu_ms_per_record": round(statistics.median(cpu), 4),
                     "records_per_s": round(statistics.median(rate), 1),
                     "runs_cpu_ms_per_record": cpu, "runs_records_per_s": rate}
    return out


# --- the three hops, each run in a child process -------------------------------------

def hop_librdkafka(args: argparse.Namespace, src: str, dst: str) -> dict[str, float]:
    from confluent_kafka import Consumer, Producer, TopicPartition

    consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": args.group,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    producer = Producer({"bootstrap.servers": args.bootstrap, "acks": "all",
                         "enable.idempotence": True, "linger.ms": 2})
    consumer.subscribe([src])
    seen = 0
    t0 = c0 = 0.0
    while seen < args.count:
        batch = consumer.consume(BATCH, 1.0)
        if not batch:
            continue
        if not seen:
            t0, c0 = time.perf_counter(), time.process_time()
        offsets: dict[int, int] = {}
        for m in batch:
            if m.error():
                raise RuntimeError(str(m.error()))
            producer.produce(dst, m.value(), m.key())
            offsets[m.partition()] = m.offset() + 1
        if producer.flush(30) != 0:
            raise RuntimeError("records not acknowledged")
        consumer.commit(offsets=[TopicPartition(src, p, o) for p, o in offsets.items()],
                        asynchronous=False)
        seen += len(batch)
    result = figures(seen, time.process_time() - c0, time.perf_counter() - t0)
    consumer.close()
    return result


async def hop_aiokafka(args: argparse.Namespace, src: str, dst: str) -> dict[str, float]:
    from aiokafka import AIOKafkaConsumer

    from mailflow.kafka_io import AsyncProducer

    consumer = AIOKafkaConsumer(src, bootstrap_servers=args.bootstrap, group_id=args.group,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    producer = AsyncProducer(args.bootstrap)
    await consumer.start()
    seen = 0
    t0 = c0 = 0.0
    try:
        while seen < args.count:
            batches = await consumer.getmany(timeout_ms=1000, max_records=BATCH)
            if not batches:
                continue
            if not seen:
                t0, c0 = time.perf_counter(), time.process_time()
            acks = []
            offsets = {}
            for tp, records in batches.items():
                for r in records:
                    acks.append(producer.produce(dst, r.key, r.value))
                offsets[tp] = records[-1].offset + 1
                seen += len(records)
            await asyncio.gather(*acks)
            await consumer.commit(offsets)
        return figures(seen, time.process_time() - c0, time.perf_counter() - t0)
    finally:
        await consumer.stop()


def hop_stage(args: argparse.Namespace, src_short: str, dst_short: str, prefix: str) -> None:
    """Runs a Faust worker until `args.count` records are forwarded and committed;
    prints the figures and exits the process (a Faust worker owns its loop)."""
    import faust

    from mailflow.config import Settings
    from streams import app as streams_app

    datadir = Path(tempfile.mkdtemp(prefix="hop-stage-"))
    settings = Settings(kafka_bootstrap=args.bootstrap, data_dir=datadir,
                        topic_prefix=prefix, partitions=args.partitions)
    stage = args.group.removeprefix(prefix)
    replica = streams_app.claim_replica(settings, stage)
    app = streams_app.make_app(stage, settings, replica)
    state: dict[str, float] = {"seen": 0}

    def started() -> None:
        if not state["seen"]:
            state["t0"], state["c0"] = time.perf_counter(), time.process_time()
        state["seen"] += 1

    try:
        from streams.runtime import Outputs, Stage
    except ImportError:  # a --baseline checkout from before streams/runtime.py
        from agents.common import StageIO  # type: ignore[import-not-found]

        io = StageIO(app, settings, stage)

        async def forward_old(raw: bytes | None) -> list[Any]:
            started()
            return [await io.send(dst_short, None, raw or b"")]

        @app.agent(io.topic(src_short), name=args.group)
        async def hop(stream: faust.StreamT) -> None:
            await io.run_batches(stream, forward_old)
    else:
        runtime = Stage(app, settings, stage)

        async def forward(raw: bytes | None) -> Outputs:
            started()
            out = runtime.outputs()
            out.send(dst_short, None, raw or b"")
            return out

        agent_mode, concurrency = STAGE_MODES[args.child]
        runtime.agent(src_short, forward, name=args.group, mode=agent_mode, concurrency=concurrency)

    @app.timer(0.05)
    async def done() -> None:
        # Finished when Faust has committed every partition up to its end.
        if state["seen"] < args.count:
            return
        committed = app.consumer._committed_offset
        total = sum(off or 0 for tp, off in committed.items() if tp.topic == f"{prefix}{src_short}")
        if total < args.count:
            return
        result = figures(int(state["seen"]), time.process_time() - state["c0"],
                         time.perf_counter() - state["t0"])
        # Faust redirects sys.stdout to its logger: write to the file descriptor.
        os.write(1, (RESULT_TAG + json.dumps(result) + "\n").encode())
        os._exit(0)

    worker = faust.Worker(app, loglevel="warning", quiet=True)
    worker.spinner = None
    worker.execute_from_commandline()


def child(args: argparse.Namespace) -> None:
    import uvloop  # as every mailflow process runs (MAILFLOW_EVENT_LOOP's default)

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    src, dst = f"{args.prefix}in", f"{args.prefix}out"
    if args.child == "librdkafka":
        result = hop_librdkafka(args, src, dst)
    elif args.child == "aiokafka":
        result = asyncio.run(hop_aiokafka(args, src, dst))
    else:
        sys.argv = [sys.argv[0], "worker"]  # Faust's Worker reads its own command line
        hop_stage(args, "in", "out", args.prefix)
        return
    print(RESULT_TAG + json.dumps(result), flush=True)


# --- the driver ----------------------------------------------------------------------

def fill(args: argparse.Namespace) -> None:
    from confluent_kafka import Producer

    from mailflow.config import Settings
    from streams.topics import create_topics

    settings = Settings(kafka_bootstrap=args.bootstrap, topic_prefix=args.prefix)
    create_topics(settings, [(f"{args.prefix}in", args.partitions, {}),
                             (f"{args.prefix}out", args.partitions, {})])
    producer = Producer({"bootstrap.servers": args.bootstrap, "acks": "all", "linger.ms": 20})
    value = os.urandom(args.size // 2).hex().encode()[: args.size]
    for i in range(args.count):
        while True:
            try:
                producer.produce(f"{args.prefix}in", value, str(i).encode())
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(60) != 0:
        raise RuntimeError("input records not acknowledged")


def run_child(args: argparse.Namespace, mode: str, run: int) -> dict[str, float]:
    code = Path(__file__).resolve().parents[1]
    if mode == BASELINE:
        mode, code = "stage", Path(args.baseline).resolve()
        group = f"{args.prefix}baseline{run}"
    else:
        group = f"{args.prefix}{mode}{run}"
    # The stage's code comes from `code` (PYTHONPATH); this script is the same.
    cmd = [sys.executable, __file__, "--child", mode, "--group", group, "--prefix", args.prefix,
           "--count", str(args.count), "--bootstrap", args.bootstrap,
           "--partitions", str(args.partitions)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                          env={**os.environ, "PYTHONPATH": str(code)})
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"{mode} run {run} gave no figures (exit {proc.returncode}):\n"
                       f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    from mailflow.config import Settings
    from streams.topics import delete_prefix_topics

    fill(args)
    modes = [*args.modes, BASELINE] if args.baseline else list(args.modes)
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    try:
        for run in range(args.runs):
            for mode in modes:
                result = run_child(args, mode, run)
                runs[mode].append(result)
                print(f"run {run + 1} {mode:14s} {result['cpu_ms_per_record']:.4f} ms CPU/record "
                      f"{result['records_per_s']:9.0f} records/s", flush=True)
    finally:
        delete_prefix_topics(Settings(kafka_bootstrap=args.bootstrap, topic_prefix=args.prefix))
    summary = summarize(runs)
    for mode, s in summary.items():
        print(f"median     {mode:14s} {s['cpu_ms_per_record']:.4f} ms CPU/record "
              f"{s['records_per_s']:9.0f} records/s")
    print(json.dumps({"bench": "hop", "count": args.count, "size": args.size, "runs": args.runs,
                      "partitions": args.partitions, "modes": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
