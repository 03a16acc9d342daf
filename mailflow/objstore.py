"""The object store for message bodies (obstore): a local directory or ``s3://``.

Bodies are written once under ``messages/<id>.eml`` and never changed, so a write
repeated after a crash is harmless and readers need no locking.

A ``file://`` store is read and written here with plain file calls, in obstore's
own layout (the key's path under the root, a staged file renamed into place, no
fsync, as obstore's local store does). Writes are off the event loop: creating a
file waited 0.1 – 0.7 ms for the file system's journal while the broker and the
stages' stores were writing, and in the loop that wait stalled the stage. But a
thread per write costs what obstore costs, 0.25 – 0.5 ms of CPU for a 4 KB body,
nearly all of it the hand-offs between threads (the sent-folder stage spent a
third of its CPU so); the write itself is 0.04 ms. So the bodies put in one turn
of the event loop (a stage's batch: every handler runs up to its put before the
loop turns) are written by one job in a thread, one hand-off each way for all of
them (`_Writer`; docs/BENCHMARKS.md, "Whole path, session 13"). Small bodies are
read in the loop. Keys this module does not make go through obstore.

A message's body that a stage stores (`store_body`: the Sent copy, local mail) goes
into a **pack** in a file store: the bodies of one turn are written as one file,
``packs/<yyyymmdd>/<pid>-<tag>-<n>.pack``, and each body's reference is a range of
it, ``<key>#<offset>,<length>``. On this machine's file system creating a file cost
0.05 ms of kernel CPU idle and 0.3 – 0.6 ms while the broker wrote (one file per
message was the sent-folder stage's largest thread); a pack costs that once for the
turn. A pack is never seen half-written: nothing refers to it until its write has
returned, so it needs no staged name and no rename; a crash mid-write leaves a file
nothing refers to. `get_body` reads any reference, a key or a range (a range of an
``s3://`` store is a ranged GET).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import obstore
from obstore.store import from_url

# Bodies up to this size are read in the event loop's thread; larger ones in a thread.
INLINE_IO_BYTES = 256 * 1024
# Keys whose file path is exactly the key under the root, as obstore maps it: no
# percent-encoding, no "." or ".." segments.
_PLAIN_KEY = re.compile(r"(?:[A-Za-z0-9_-][A-Za-z0-9._-]*/)*[A-Za-z0-9_-][A-Za-z0-9._-]*")
_staged = itertools.count()
# In staged names beside the pid: a process that crashed mid-write left its staged
# file, and the next one (the same pid, in a container) counts from 0 again.
_STAGED_TAG = os.urandom(4).hex()
# A pack holds at most this much (more bodies in one turn start another pack); a body
# larger than this is stored under its own key. Also the most a range reference may
# ask for: a reference in a record cannot make a reader allocate more.
PACK_MAX_BYTES = 8 * 1024 * 1024
_RANGE_REF = re.compile(r"(?P<key>[^#]+)#(?P<offset>[0-9]{1,15}),(?P<length>[0-9]{1,15})")


def body_key(message_id: str) -> str:
    return f"messages/{message_id}.eml"


@lru_cache(maxsize=8)
def open_store(url: str) -> Any:
    if url.startswith("file://"):
        Path(url.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        return from_url(url, mkdir=True)
    return from_url(url)


@lru_cache(maxsize=8)
def local_root(url: str) -> str | None:
    """The directory of a ``file://`` store, or None for any other store."""
    parts = urlparse(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        return None
    return url2pathname(parts.path)


def _local_path(url: str, key: str) -> str | None:
    root = local_root(url)
    if root is None or not _PLAIN_KEY.fullmatch(key):
        return None
    return os.path.join(root, key)


def _write_file(path: str, data: bytes) -> None:
    # A staged name of this process's own, then a rename: a reader sees the whole
    # body or none, and two writers of one key (a record handled twice) never mix.
    staged = f"{path}#{os.getpid()}.{_STAGED_TAG}.{next(_staged)}"
    try:
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        os.unlink(staged)
        raise
    os.close(fd)
    os.rename(staged, path)


def _write_files(batch: list[tuple[str, bytes]]) -> list[BaseException | None]:
    """Write each (path, body); what each write raised, or None (in a thread)."""
    out: list[BaseException | None] = []
    for path, data in batch:
        try:
            _write_file(path, data)
            out.append(None)
        except BaseException as exc:  # noqa: BLE001 (handed to that body's caller)
            out.append(exc)
    return out


def _write_pack(root: str, bodies: list[bytes]) -> list[str]:
    """Write `bodies` as one new pack under `root`; each body's range reference."""
    key = (f"packs/{time.strftime('%Y%m%d', time.gmtime())}/"
           f"{os.getpid()}-{_STAGED_TAG}-{next(_staged)}.pack")
    path = os.path.join(root, key)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, flags, 0o666)
    try:
        # One write of the joined bytes: a writev of the parts cost twice the kernel CPU.
        view = memoryview(b"".join(bodies))
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    refs, offset = [], 0
    for body in bodies:
        refs.append(f"{key}#{offset},{len(body)}")
        offset += len(body)
    return refs


def _write_packs(batch: list[tuple[str, bytes]]) -> list[str | BaseException]:
    """Pack each (root, body), up to PACK_MAX_BYTES a pack; each body's reference or
    what its pack's write raised (in a thread)."""
    out: list[str | BaseException] = []
    i = 0
    while i < len(batch):
        root, size, j = batch[i][0], 0, i
        while j < len(batch) and batch[j][0] == root and (j == i or size + len(batch[j][1]) <= PACK_MAX_BYTES):
            size += len(batch[j][1])
            j += 1
        try:
            out.extend(_write_pack(root, [data for _, data in batch[i:j]]))
        except BaseException as exc:  # noqa: BLE001 (handed to those bodies' callers)
            out.extend([exc] * (j - i))
        i = j
    return out


def _write_batch(files: list[tuple[str, bytes]], packed: list[tuple[str, bytes]],
                 ) -> tuple[list[BaseException | None], list[str | BaseException]]:
    return _write_files(files) if files else [], _write_packs(packed) if packed else []


class _Writer:
    """One event loop's pending writes: those queued in one turn of the loop go to
    the default executor as one job, and are settled together when it is done."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.files: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self.packed: list[tuple[str, bytes, asyncio.Future[str]]] = []

    def _queue(self) -> None:
        if not self.files and not self.packed:
            self.loop.call_soon(self._flush)

    def put(self, path: str, data: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self.loop.create_future()
        self._queue()
        self.files.append((path, data, fut))
        return fut

    def pack(self, root: str, data: bytes) -> asyncio.Future[str]:
        fut: asyncio.Future[str] = self.loop.create_future()
        self._queue()
        self.packed.append((root, data, fut))
        return fut

    def _flush(self) -> None:
        files, self.files = self.files, []
        packed, self.packed = self.packed, []
        futures: list[asyncio.Future[Any]] = [f for *_, f in files] + [f for *_, f in packed]

        def settle(results: list[Any]) -> None:
            for fut, res in zip(futures, results, strict=True):
                if fut.done():  # its caller was cancelled
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

        def done(job: asyncio.Future[tuple[list[Any], list[Any]]]) -> None:
            if job.cancelled():
                settle([RuntimeError("the body write was cancelled")] * len(futures))
            elif (exc := job.exception()) is not None:
                settle([exc] * len(futures))
            else:
                written, refs = job.result()
                settle([*written, *refs])

        try:
            job = self.loop.run_in_executor(None, _write_batch, [(p, d) for p, d, _ in files],
                                            [(r, d) for r, d, _ in packed])
        except RuntimeError as exc:  # the executor is shut down: the callers must hear it
            settle([exc] * len(futures))
            return
        job.add_done_callback(done)


_writers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Writer] = weakref.WeakKeyDictionary()


def _writer() -> _Writer:
    loop = asyncio.get_running_loop()
    w = _writers.get(loop)
    if w is None:
        w = _writers[loop] = _Writer(loop)
    return w


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_small(path: str) -> bytes | None:
    """The file's bytes if it is at most INLINE_IO_BYTES long, else None."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > INLINE_IO_BYTES:
            return None
        return f.read()


async def store_body(url: str, message_id: str, data: bytes) -> str:
    """Store a message's body; its reference (`body_ref`), for `get_body`.

    In a file store the body goes into this turn's pack (the module's docstring);
    in any other store, and a body over PACK_MAX_BYTES, under ``body_key``.
    """
    root = local_root(url)
    if root is None or len(data) > PACK_MAX_BYTES:
        key = body_key(message_id)
        await put_body(url, key, data)
        return key
    return await _writer().pack(root, data)


async def put_body(url: str, key: str, data: bytes) -> None:
    path = _local_path(url, key)
    if path is None:
        await obstore.put_async(open_store(url), key, data)
    else:
        await _writer().put(path, data)


async def get_body(url: str, key: str) -> bytes:
    """The body under `key`, a key or a range reference (`store_body`);
    FileNotFoundError when there is none (as obstore's)."""
    if "#" in key:
        return await _get_range(url, key)
    path = _local_path(url, key)
    if path is None:
        result = await obstore.get_async(open_store(url), key)
        return bytes(await result.bytes_async())
    small = _read_small(path)
    return small if small is not None else await asyncio.to_thread(_read_file, path)


def _read_range(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), length, offset)
    if len(data) != length:
        # Not an OSError: the stages retry those for ever (a store that is down comes
        # back), and a pack cut short does not heal; the record is parked instead.
        raise ValueError(f"{path} ends before the body's {length} bytes at {offset}")
    return data


async def _get_range(url: str, ref: str) -> bytes:
    m = _RANGE_REF.fullmatch(ref)
    if m is None or int(m["length"]) > PACK_MAX_BYTES:
        raise ValueError(f"not a body reference: {ref[:200]!r}")
    key, offset, length = m["key"], int(m["offset"]), int(m["length"])
    path = _local_path(url, key)
    if path is None:
        if not length:
            return b""
        return bytes(await obstore.get_range_async(open_store(url), key, start=offset, length=length))
    if length <= INLINE_IO_BYTES:
        return _read_range(path, offset, length)
    return await asyncio.to_thread(_read_range, path, offset, length)


async def delete_body(url: str, key: str) -> None:
    path = _local_path(url, key)
    if path is None:
        await obstore.delete_async(open_store(url), key)
    else:
        os.unlink(path)
