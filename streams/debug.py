"""What a stage's consumer is doing, for an operator asking why a stage does not move:
``GET /debug/consumer`` on the stage's web port (`register_debug_page`).

It answers with one JSON document: whether the app is rebalancing and its consumer
generation; whether Faust's flow is active; every assigned partition with its fetch
position (asked of the consumer, and as `refetch_holes` reads it), its committed offset, the offsets acknowledged and not yet committed, the
records in flight (taken by a stage, not yet acknowledged) and whether it is paused
or active for Faust's fetcher; each batch feed's buffer (`streams.feed`); and the
asyncio tasks of the process, each with where it waits. It reads Faust's private
consumer state (nothing here changes it), so its fields follow faust-streaming's
pinned version (`streams.faust_compat`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import faust


def _where(task: asyncio.Task[Any]) -> str:
    """The task's coroutines from outermost to the one waiting, and where that waits."""
    names: list[str] = []
    coro: Any = task.get_coro()
    frame: Any = None
    while coro is not None and len(names) < 12:
        names.append(getattr(coro, "__qualname__", type(coro).__name__))
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or frame
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    where = (f" at {frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno}"
             if frame is not None else "")
    return " > ".join(names) + where


async def consumer_state(app: faust.App) -> dict[str, Any]:
    from streams.faust_compat import fetch_position, in_flight_offsets
    from streams.feed import FEEDS

    consumer: Any = app.consumer
    assigned = sorted(consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
    active = getattr(consumer, "_active_partitions", None)
    paused: set[Any] = set()
    thread = getattr(consumer, "_thread", None)
    inner = getattr(thread, "_consumer", None)
    if inner is not None:
        paused = set(inner.paused())
    in_flight = in_flight_offsets(consumer)
    partitions = []
    for tp in assigned:
        try:
            position = await asyncio.wait_for(consumer.position(tp), 2.0)
        except Exception as exc:  # noqa: BLE001 (reported, not raised: this is a diagnosis)
            position = repr(exc)
        acked = sorted(consumer._acked.get(tp, ()))
        partitions.append({
            "topic": tp.topic, "partition": tp.partition, "position": position,
            # as `refetch_holes` reads it, without a call into the consumer thread
            "fetch_position": fetch_position(consumer, tp),
            "committed": consumer._committed_offset.get(tp),
            "acked": [acked[0], acked[-1], len(acked)] if acked else [],
            "in_flight": sorted(in_flight.get(tp, []))[:20],
            "paused": tp in paused,
            "active": active is None or tp in active,
        })
    feeds = [{"channel": repr(channel)[:120], "buffered": len(feed.buffer), "ready": feed.ready,
              "waiting": feed._waiter is not None,
              "paused": sorted(f"{tp.topic}:{tp.partition}" for tp in feed.paused)}
             for channel, feed in list(FEEDS.items())]
    tasks = sorted(_where(t) for t in asyncio.all_tasks() if not t.done())
    return {
        "ts": time.time(),
        "rebalancing": bool(app.rebalancing),
        "generation": app.consumer_generation_id,
        "flow_active": app.flow_control.is_active(),
        "suspend_flow": consumer.suspend_flow.is_set(),
        "partitions": partitions,
        "feeds": feeds,
        "tasks": tasks,
    }


def register_debug_page(app: faust.App) -> None:
    @app.page("/debug/consumer")
    async def debug_consumer(web: Any, request: Any) -> Any:
        return web.json(await consumer_state(app))
