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
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
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


class _Writer:
    """One event loop's pending writes: those queued in one turn of the loop go to
    the default executor as one job, and are settled together when it is done."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[tuple[str, bytes, asyncio.Future[None]]] = []

    def put(self, path: str, data: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self.loop.create_future()
        if not self.pending:
            self.loop.call_soon(self._flush)
        self.pending.append((path, data, fut))
        return fut

    def _flush(self) -> None:
        batch, self.pending = self.pending, []

        def settle(failures: list[BaseException | None]) -> None:
            for (_, _, fut), exc in zip(batch, failures, strict=True):
                if fut.done():  # its caller was cancelled
                    continue
                if exc is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(exc)

        def done(job: asyncio.Future[list[BaseException | None]]) -> None:
            if job.cancelled():
                settle([RuntimeError("the body write was cancelled")] * len(batch))
            elif (exc := job.exception()) is not None:
                settle([exc] * len(batch))
            else:
                settle(job.result())

        try:
            job = self.loop.run_in_executor(None, _write_files, [(p, d) for p, d, _ in batch])
        except RuntimeError as exc:  # the executor is shut down: the callers must hear it
            settle([exc] * len(batch))
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


async def put_body(url: str, key: str, data: bytes) -> None:
    path = _local_path(url, key)
    if path is None:
        await obstore.put_async(open_store(url), key, data)
    else:
        await _writer().put(path, data)


async def get_body(url: str, key: str) -> bytes:
    """The body under `key`; FileNotFoundError when there is none (as obstore's)."""
    path = _local_path(url, key)
    if path is None:
        result = await obstore.get_async(open_store(url), key)
        return bytes(await result.bytes_async())
    small = _read_small(path)
    return small if small is not None else await asyncio.to_thread(_read_file, path)


async def delete_body(url: str, key: str) -> None:
    path = _local_path(url, key)
    if path is None:
        await obstore.delete_async(open_store(url), key)
    else:
        os.unlink(path)
