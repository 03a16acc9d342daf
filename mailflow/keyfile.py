"""Server secrets kept as files under the data dir, made on first use.

`key(settings, name, env)` is the value of the environment variable `env` when it
is set (a deployment on several machines sets it the same on each), else 32
random bytes in ``<MAILFLOW_SECRETS_DIR>/<name>.key`` (default ``<DATA_DIR>/secrets``;
directory 0700, file 0600), created once, atomically, by whichever process needs it
first. Never logged. Processes that must agree on a secret (the API replicas and the
webhooks stage) share that directory or the variable.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from mailflow.config import Settings

_CACHE: dict[str, bytes] = {}  # file path -> its secret, read once per process


def key(settings: Settings, name: str, env: str) -> bytes:
    value = os.environ.get(env, "")
    if value:
        return value.encode()
    path = Path(os.environ.get("MAILFLOW_SECRETS_DIR") or Path(settings.data_dir) / "secrets") / f"{name}.key"
    if str(path) not in _CACHE:
        _CACHE[str(path)] = read_or_make(path)
    return _CACHE[str(path)]


def read_or_make(path: Path) -> bytes:
    """The bytes in `path`; 32 random ones written there first if it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # atomic: a complete file or none; the first process wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes()
