"""Running stages: one Faust worker process per stage replica.

`mailflow worker --stages deliver` runs one replica in this process. With several
stages (or `all`) it supervises one child process per stage, so each stage keeps
its own consumer group, its own data dir and its own web port, exactly as when
they run on separate machines.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import faust
import orjson

from mailflow.config import Settings
from mailflow.heap import freeze_startup
from streams.app import (
    STAGES,
    claim_replica,
    input_topics,
    internal_topics,
    make_app,
    mark_clean_shutdown,
    reset_tables_after_crash,
)
from streams.topics import ensure_topics, full_name, group_id, init_group_offsets

log = logging.getLogger("mailflow.worker")

# How often a consuming replica puts its web address on the ``registry`` topic; the
# ingress routes mailbox and status reads to the replicas it has heard from lately.
# A replica that has just got its partitions says so within HEARTBEAT_CHECK seconds,
# not a whole period later: a replica started in place of a killed one is otherwise
# absent from the registry for up to a period after the killed one's entry went stale.
HEARTBEAT_SECONDS = 5.0
HEARTBEAT_CHECK = 1.0


def parse_stages(text: str) -> list[str]:
    stages = list(STAGES) if text.strip() == "all" else [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"unknown stage(s) {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(STAGES)} or all")
    return stages


def available(stage: str) -> bool:
    """Whether the stage's module exists; `run` skips, naming them, those that do not."""
    return importlib.util.find_spec(f"agents.{stage}") is not None


def build_app(stage: str, settings: Settings) -> faust.App:
    from streams.debug import register_debug_page
    from streams.runtime import register_metrics_page

    replica = claim_replica(settings, stage)
    app = make_app(stage, settings, replica)
    importlib.import_module(f"agents.{stage}").register(app, settings)
    register_metrics_page(app)
    register_debug_page(app)
    registry = app.topic(full_name(settings, "registry"), key_serializer="raw",
                         value_serializer="raw", key_type=bytes, value_type=bytes)
    url = str(app.conf.canonical_url)

    last: dict[str, Any] = {"at": 0.0, "generation": None}

    @app.timer(HEARTBEAT_CHECK)
    async def heartbeat() -> None:
        # The ingress routes mailbox and status reads to a live replica it finds here;
        # only once it holds partitions and is not rebalancing, so "registered" also
        # means "consuming" (tests and `mailflow up` wait on it).
        if app.rebalancing or not app.consumer.assignment():
            return
        now, generation = time.monotonic(), app.consumer_generation_id
        if now - last["at"] < HEARTBEAT_SECONDS and generation == last["generation"]:
            return
        await registry.send(key=f"{stage}|{url}".encode(), value=orjson.dumps(
            {"stage": stage, "url": url, "pid": os.getpid(), "replica": replica.index,
             "ts": time.time()}))
        if last["generation"] is None:  # started and consuming: what exists now stays
            freeze_startup()
        last.update(at=now, generation=generation)

    return app


def run_stage(stage: str, settings: Settings, loglevel: str = "warning") -> int:
    module = importlib.import_module(f"agents.{stage}")
    if not hasattr(module, "register"):  # a stage that is not a Faust app (retry)
        ensure_topics(settings)
        from prometheus_client import start_http_server

        replica = claim_replica(settings, stage)
        start_http_server(replica.web_port, addr=settings.api_host)
        return int(module.run(settings, f"http://{settings.web_advertise_host}:{replica.web_port}"))
    app = build_app(stage, settings)
    ensure_topics(settings, extra=internal_topics(app))
    init_group_offsets(settings, group_id(settings, stage), input_topics(settings, stage))
    datadir = Path(app.conf.datadir)
    if reset_tables_after_crash(datadir, Path(app.conf.tabledir)):
        print(f"mailflow: stage {stage} did not stop cleanly last time; "
              "restoring its tables from their changelogs", file=sys.stderr, flush=True)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    # Faust's terminal spinner sets the root logger to DEBUG so it can spin on every
    # record, and building and handling every debug line of aiokafka and Faust costs
    # a tenth of a stage's CPU. Workers run under a supervisor; no spinner.
    worker.spinner = None
    print(f"mailflow: stage {stage} starting, web {app.conf.canonical_url}, "
          f"data {app.conf.datadir}", file=sys.stderr, flush=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code in (0, None):  # stopped by a signal after flushing and committing
            mark_clean_shutdown(datadir)
        raise
    return 0


def run(stages: list[str], settings: Settings, loglevel: str = "warning") -> int:
    missing = [s for s in stages if not available(s)]
    if missing:
        print(f"mailflow: stage(s) not built yet, skipped: {', '.join(missing)}", file=sys.stderr)
        stages = [s for s in stages if s not in missing]
    if len(stages) == 1:
        return run_stage(stages[0], settings, loglevel)
    from mailflow.ops.supervise import Supervisor

    ensure_topics(settings)
    sup = Supervisor()
    for s in stages:
        sup.add(s, [sys.executable, "-m", "mailflow.ops.cli", "worker", "--stages", s,
                    "--loglevel", loglevel], restart=True)
    return sup.run_forever()
