"""mailflow/objstore.py: a file store read and written with plain file calls, in
obstore's own layout, so either side reads what the other wrote."""

from __future__ import annotations

import os
from pathlib import Path

import obstore
import pytest

from mailflow import objstore
from mailflow.objstore import body_key, delete_body, get_body, open_store, put_body


@pytest.fixture
def url(tmp_path: Path) -> str:
    # A space in the path: the URL is percent-encoded, the directory is not.
    return (tmp_path / "objects here").absolute().as_uri()


async def test_a_body_written_here_is_read_by_obstore_and_the_other_way(url: str) -> None:
    key = body_key("01JABCDEF")
    await put_body(url, key, b"Subject: hi\r\n\r\nbody\r\n")
    root = objstore.local_root(url)
    assert root is not None and " " in root
    on_disk = Path(root, "messages", "01JABCDEF.eml").read_bytes()  # noqa: ASYNC240 (a test's file)
    assert on_disk == b"Subject: hi\r\n\r\nbody\r\n"
    got = await obstore.get_async(open_store(url), key)
    assert bytes(await got.bytes_async()) == b"Subject: hi\r\n\r\nbody\r\n"

    await obstore.put_async(open_store(url), body_key("02OTHER"), b"from obstore")
    assert await get_body(url, body_key("02OTHER")) == b"from obstore"


async def test_a_rewrite_replaces_the_body_whole_and_leaves_no_staged_file(url: str) -> None:
    key = body_key("03SAME")
    await put_body(url, key, b"first")
    await put_body(url, key, b"second, longer")
    assert await get_body(url, key) == b"second, longer"
    root = objstore.local_root(url)
    assert root is not None
    assert os.listdir(os.path.join(root, "messages")) == ["03SAME.eml"]


async def test_a_large_body_goes_through_a_thread_and_reads_back_the_same(url: str) -> None:
    big = os.urandom(objstore.INLINE_IO_BYTES + 1)
    await put_body(url, body_key("04BIG"), big)
    assert await get_body(url, body_key("04BIG")) == big


async def test_a_missing_body_is_file_not_found_as_obstore_says(url: str) -> None:
    await put_body(url, body_key("05THERE"), b"x")  # the directory exists
    with pytest.raises(FileNotFoundError):
        await get_body(url, body_key("nothere"))
    with pytest.raises(FileNotFoundError):
        await delete_body(url, body_key("nothere"))
    await delete_body(url, body_key("05THERE"))
    with pytest.raises(FileNotFoundError):
        await get_body(url, body_key("05THERE"))


async def test_keys_obstore_would_encode_go_through_obstore(url: str) -> None:
    assert objstore._local_path(url, "messages/a b.eml") is None
    assert objstore._local_path(url, "messages/../x.eml") is None
    assert objstore._local_path(url, "messages/.hidden") is None
    assert objstore._local_path("s3://bucket/prefix", body_key("06ID")) is None
    await put_body(url, "messages/a b.eml", b"spaced")
    got = await obstore.get_async(open_store(url), "messages/a b.eml")
    assert bytes(await got.bytes_async()) == b"spaced"
    assert await get_body(url, "messages/a b.eml") == b"spaced"
