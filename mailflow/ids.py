"""Message ids: 26 characters, sortable by creation time (ULID layout)."""

from __future__ import annotations

import base64
import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
# base64's base32 (C) does the digit work; its RFC 4648 alphabet is mapped onto ours.
_FROM_RFC4648 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())


def encode(value: int) -> str:
    """The low 130 bits of `value` as 26 digits of the id alphabet, most significant first."""
    # 20 bytes are 32 base32 digits; the last 26 of them are the low 130 bits.
    digits = base64.b32encode((value & ((1 << 130) - 1)).to_bytes(20, "big"))[6:]
    return digits.translate(_FROM_RFC4648).decode()


def new_id(now: float | None = None) -> str:
    ms = int((time.time() if now is None else now) * 1000)
    return encode((ms << 80) | int.from_bytes(os.urandom(10), "big"))


def is_id(text: str) -> bool:
    return len(text) == 26 and all(c in _ALPHABET for c in text)
