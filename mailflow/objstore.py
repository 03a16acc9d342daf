"""The object store for message bodies (obstore): a local directory or ``s3://``.

Bodies are written once under ``messages/<id>.eml`` and never changed, so a write
repeated after a crash is harmless and readers need no locking.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import obstore
from obstore.store import from_url


def body_key(message_id: str) -> str:
    return f"messages/{message_id}.eml"


@lru_cache(maxsize=8)
def open_store(url: str) -> Any:
    if url.startswith("file://"):
        Path(url.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        return from_url(url, mkdir=True)
    return from_url(url)


async def put_body(url: str, key: str, data: bytes) -> None:
    await obstore.put_async(open_store(url), key, data)


async def get_body(url: str, key: str) -> bytes:
    result = await obstore.get_async(open_store(url), key)
    return bytes(await result.bytes_async())


async def delete_body(url: str, key: str) -> None:
    await obstore.delete_async(open_store(url), key)
