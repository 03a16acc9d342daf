"""A patch to aiokafka (Faust's Kafka client) for partition leaders that move.

aiokafka 0.14's fetcher, looking up a partition's start position (ListOffsets, right
after an assignment or a reset), logs an error that says the leader it asked is not
the leader any more ("Failed fetch offsets from 3: NotLeaderForPartitionError"),
waits `retry_backoff` and asks the same node again: unlike its other paths it never
refreshes the metadata that named that node. The consumer then stays on the stale
leader until the periodic refresh (`metadata_max_age_ms`, five minutes). A cluster
chaos run lost its validate stage that way: restarted while a killed broker came
back and took its leaderships again, the replica asked the old leader about the
assignor's leader topic 681 times and never read a record. A response that says
the metadata is stale now asks for fresh metadata, as the fetch path does.

Imported by streams/app.py, so every stage has it.
"""

from __future__ import annotations

from typing import Any

from aiokafka import errors as Errors
from aiokafka.consumer.fetcher import Fetcher

_proc_offset_request = Fetcher._proc_offset_request


async def _offsets_refreshing_stale_metadata(self: Any, node_id: int, topic_data: Any) -> Any:
    try:
        return await _proc_offset_request(self, node_id, topic_data)
    except Errors.KafkaError as err:
        if getattr(err, "invalid_metadata", False):
            self._client.force_metadata_update()
        raise


Fetcher._proc_offset_request = _offsets_refreshing_stale_metadata
