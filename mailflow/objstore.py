"""The object store for message bodies (obstore): a local directory or ``s3://``.

Bodies are written once under ``messages/<id>.eml`` and never changed, so a write
repeated after a crash is harmless and readers need no locking.

A ``file://`` store is read and written here with plain file calls, in obstore's
own layout (the key's path under the root, a staged file renamed into place, no
fsync, as obstore's local store does). obstore's async calls cost 0.25 – 0.36 ms of
CPU for a 4 KB put (its tokio workers and the hand-off back to the event loop: a
third of the sent-folder stage's CPU), a plain write and rename 0.04 ms
(docs/BENCHMARKS.md, "Whole path, session 13"). Small bodies are written in the
event loop's thread: a page-cache write of a few KB blocks it for less than a
thread hand-off would cost. Keys this module does not make go through obstore.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import obstore
from obstore.store import from_url

# Bodies up to this size are read and written inline; larger ones in a thread.
INLINE_IO_BYTES = 256 * 1024
# Keys whose file path is exactly the key under the root, as obstore maps it: no
# percent-encoding, no "." or ".." segments.
_PLAIN_KEY = re.compile(r"(?:[A-Za-z0-9_-][A-Za-z0-9._-]*/)*[A-Za-z0-9_-][A-Za-z0-9._-]*")
_staged = itertools.count()


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
    staged = f"{path}#{os.getpid()}.{next(_staged)}"
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
    elif len(data) <= INLINE_IO_BYTES:
        _write_file(path, data)
    else:
        await asyncio.to_thread(_write_file, path, data)


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
