"""streams/faust_compat.py, the aiokafka fetcher patch: a ListOffsets answer naming a stale leader refreshes the
metadata (aiokafka 0.14 retried the same node until its five-minute refresh)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import errors as Errors
from aiokafka.consumer.fetcher import Fetcher

from streams import faust_compat


class Client:
    """The two calls the offset lookup makes on aiokafka's client."""

    def __init__(self, error: Exception) -> None:
        self.error, self.refreshed = error, 0

    async def send(self, node_id: int, request: object) -> object:
        raise self.error

    def force_metadata_update(self) -> None:
        self.refreshed += 1


class Stub:
    _isolation_level = 0

    def __init__(self, client: Client) -> None:
        self._client = client


@pytest.fixture(autouse=True, scope="module")
def _installed() -> None:
    faust_compat.install()  # as a stage worker does (make_app)


def test_the_patch_is_installed():
    assert Fetcher._proc_offset_request is faust_compat._offsets_refreshing_stale_metadata


def test_a_stale_leader_answer_refreshes_metadata_and_still_fails_this_try():
    client = Client(Errors.NotLeaderForPartitionError())
    with pytest.raises(Errors.NotLeaderForPartitionError):
        asyncio.run(Fetcher._proc_offset_request(Stub(client), 3, {"t": [(0, -2)]}))
    assert client.refreshed == 1


def test_other_errors_leave_the_metadata_alone():
    client = Client(Errors.RequestTimedOutError())
    with pytest.raises(Errors.RequestTimedOutError):
        asyncio.run(Fetcher._proc_offset_request(Stub(client), 3, {"t": [(0, -2)]}))
    assert client.refreshed == 0
