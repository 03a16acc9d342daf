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


async def test_a_large_body_is_read_through_a_thread_and_reads_back_the_same(url: str) -> None:
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


async def test_bodies_put_in_one_turn_are_written_together_and_fail_one_by_one(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    await put_body(url, body_key("07FIRST"), b"x")  # the root exists
    root = objstore.local_root(url)
    assert root is not None
    Path(root, "blocked").write_bytes(b"a file where a directory is wanted")  # noqa: ASYNC240 (a test's file)
    keys = [body_key(f"08N{i}") for i in range(20)]
    jobs: list[int] = []
    write_files = objstore._write_files

    def counted(batch: list[tuple[str, bytes]]) -> list[BaseException | None]:
        jobs.append(len(batch))
        return write_files(batch)

    monkeypatch.setattr(objstore, "_write_files", counted)
    results = await asyncio.gather(*(put_body(url, k, k.encode()) for k in keys[:10]),
                                   put_body(url, "blocked/x.eml", b"cannot be written"),
                                   *(put_body(url, k, k.encode()) for k in keys[10:]),
                                   return_exceptions=True)
    assert jobs == [21]  # one job in a thread for the whole turn
    assert isinstance(results[10], OSError)
    assert [r for i, r in enumerate(results) if i != 10] == [None] * 20
    for k in keys:
        assert await get_body(url, k) == k.encode()


def test_a_write_the_executor_can_no_longer_take_fails_instead_of_hanging(url: str) -> None:
    import asyncio

    async def late_write() -> None:
        await asyncio.get_running_loop().shutdown_default_executor()  # as a process stops
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(put_body(url, body_key("09LATE"), b"x"), 5)

    asyncio.run(late_write())  # a loop of its own: the tests' shared loop keeps its executor


async def test_bodies_stored_in_one_turn_share_one_pack_and_read_back_each(url: str) -> None:
    import asyncio

    bodies = [f"Subject: {i}\r\n\r\n{'x' * i}\r\n".encode() for i in range(25)]
    refs = await asyncio.gather(*(objstore.store_body(url, f"10M{i}", b) for i, b in enumerate(bodies)))
    assert len({r.partition("#")[0] for r in refs}) == 1  # one pack for the turn
    assert all(r.startswith("packs/") and "#" in r for r in refs)
    assert [await get_body(url, r) for r in refs] == bodies
    root = objstore.local_root(url)
    assert root is not None
    packs = list(Path(root, "packs").rglob("*.pack"))  # noqa: ASYNC240 (a test's dir)
    assert len(packs) == 1 and packs[0].stat().st_size == sum(map(len, bodies))
    assert not Path(root, "messages").exists()  # noqa: ASYNC240 (no file per body)
    # The next turn writes a pack of its own; nothing is rewritten.
    again = await objstore.store_body(url, "10M0", bodies[0])
    assert again.partition("#")[0] != refs[0].partition("#")[0]
    assert await get_body(url, again) == bodies[0] == await get_body(url, refs[0])


async def test_a_pack_range_reads_the_same_through_obstore(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = await objstore.store_body(url, "11R", b"0123456789")
    other = await objstore.store_body(url, "11S", b"")
    monkeypatch.setattr(objstore, "_local_path", lambda _url, _key: None)  # as an s3:// store reads
    assert await get_body(url, ref) == b"0123456789"
    assert await get_body(url, other) == b""


async def test_a_range_past_the_pack_or_too_long_is_an_error_not_a_short_body(url: str) -> None:
    ref = await objstore.store_body(url, "12P", b"short")
    key = ref.partition("#")[0]
    with pytest.raises(ValueError, match="ends before"):  # parked, not retried for ever
        await get_body(url, f"{key}#2,10")
    with pytest.raises(ValueError, match="not a body reference"):
        await get_body(url, f"{key}#0,{objstore.PACK_MAX_BYTES + 1}")
    with pytest.raises(ValueError, match="not a body reference"):
        await get_body(url, f"{key}#-1,3")
    with pytest.raises(FileNotFoundError):
        await get_body(url, "packs/19700101/none.pack#0,1")


async def test_packs_split_at_the_size_cap_and_a_larger_body_keeps_its_key(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    monkeypatch.setattr(objstore, "PACK_MAX_BYTES", 100)
    refs = await asyncio.gather(*(objstore.store_body(url, f"13C{i}", bytes([65 + i]) * 40) for i in range(3)),
                                objstore.store_body(url, "13BIG", b"B" * 101))
    assert len({r.partition("#")[0] for r in refs[:3]}) == 2  # 40 + 40, then 40
    assert refs[3] == body_key("13BIG")
    assert [await get_body(url, r) for r in refs] == [b"A" * 40, b"B" * 40, b"C" * 40, b"B" * 101]


async def test_a_pack_that_cannot_be_written_fails_its_bodies_and_leaves_key_writes_alone(url: str) -> None:
    import asyncio

    await put_body(url, body_key("14FIRST"), b"x")  # the root exists
    root = objstore.local_root(url)
    assert root is not None
    Path(root, "packs").write_bytes(b"a file where the packs directory is wanted")  # noqa: ASYNC240 (a test's file)
    results = await asyncio.gather(objstore.store_body(url, "14A", b"a"), objstore.store_body(url, "14B", b"b"),
                                   put_body(url, body_key("14KEY"), b"k"), return_exceptions=True)
    assert isinstance(results[0], OSError) and isinstance(results[1], OSError)
    assert results[2] is None
    assert await get_body(url, body_key("14KEY")) == b"k"


async def test_a_store_that_is_not_a_directory_keeps_bodies_under_their_keys(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objstore, "local_root", lambda _url: None)  # as for s3://
    ref = await objstore.store_body(url, "15S3", b"body")
    assert ref == body_key("15S3")
    assert bytes(await (await obstore.get_async(open_store(url), ref)).bytes_async()) == b"body"
