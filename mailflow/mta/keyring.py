"""The operator's secret key, and private material sealed under it (AES-256-GCM).

DKIM private keys are kept on Kafka (the compacted ``domains`` topic) only sealed:
``seal(key, plaintext, aad)`` gives ``"v1:<key id>:<base64 nonce+ciphertext>"``,
where ``aad`` (e.g. ``b"dkim|example.com|mf20261201"``) binds the ciphertext to what
it is, so a sealed value copied to another domain or selector does not open.

Where the key comes from, first match wins:

* ``MAILFLOW_SECRET_KEY``: 32 bytes in URL-safe base64 (make one with
  ``python -c "import secrets; print(secrets.token_urlsafe(32))"``); any other text
  is taken as a passphrase and hashed (SHA-256) to a key;
* ``MAILFLOW_SECRET_KEY_FILE``, else ``<data dir>/secret.key``: the same format in a
  file. When that file does not exist it is made, mode 0600, at first use (the
  first ``mailflow up``, ``domains add`` or stage start). Every process that signs
  must see the same key: one machine shares the data dir; on several machines set
  ``MAILFLOW_SECRET_KEY`` (or copy the file). Back it up: without it the sealed DKIM
  keys cannot be opened and the domains must get new keys.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mailflow.config import Settings

_VERSION = "v1"


class SealError(Exception):
    """A sealed value that does not open: another operator key, or tampered with."""


def _decode(text: str) -> bytes:
    text = text.strip()
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raw = b""
    return raw if len(raw) == 32 else hashlib.sha256(text.encode()).digest()


def key_file(settings: Settings) -> Path:
    """Where the operator key is read from (and made if missing) without MAILFLOW_SECRET_KEY."""
    return Path(os.environ.get("MAILFLOW_SECRET_KEY_FILE") or settings.data_dir / "secret.key")


def operator_key(settings: Settings) -> bytes:
    """The 32-byte operator key (see the module docstring), made once if there is none."""
    env = os.environ.get("MAILFLOW_SECRET_KEY", "")
    if env:
        return _decode(env)
    path = key_file(settings)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=") + "\n")
        try:
            os.link(tmp, path)  # fails if another process made it first: then theirs is the key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return _decode(path.read_text())


def key_id(key: bytes) -> str:
    """A short public fingerprint of the key, stored with sealed values to say which key opens them."""
    return hashlib.sha256(b"mailflow-key-id|" + key).hexdigest()[:12]


def seal(key: bytes, plaintext: bytes, aad: bytes) -> str:
    nonce = secrets.token_bytes(12)
    ct = AESGCM(key).encrypt(nonce, plaintext, aad)
    return f"{_VERSION}:{key_id(key)}:{base64.b64encode(nonce + ct).decode()}"


def unseal(key: bytes, sealed: str, aad: bytes) -> bytes:
    """The plaintext of ``seal``'s output; SealError naming the cause when it does not open."""
    try:
        version, kid, data = sealed.split(":", 2)
        raw = base64.b64decode(data)
    except ValueError as exc:
        raise SealError("not a sealed value") from exc
    if version != _VERSION:
        raise SealError(f"unknown sealed format {version!r}")
    if kid != key_id(key):
        raise SealError(f"sealed under another operator key (id {kid}, this one is {key_id(key)}): "
                        "set MAILFLOW_SECRET_KEY or MAILFLOW_SECRET_KEY_FILE to the key it was made with")
    try:
        return AESGCM(key).decrypt(raw[:12], raw[12:], aad)
    except InvalidTag as exc:
        raise SealError("sealed value does not open (tampered with, or moved to another name)") from exc
