"""mailflow.mta.keyring: the operator key and AES-GCM sealing."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from mailflow.config import Settings
from mailflow.mta.keyring import SealError, key_id, operator_key, seal, unseal


def test_key_file_made_once_mode_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILFLOW_SECRET_KEY", raising=False)
    monkeypatch.delenv("MAILFLOW_SECRET_KEY_FILE", raising=False)
    s = Settings(data_dir=tmp_path)
    k1 = operator_key(s)
    assert len(k1) == 32
    assert stat.S_IMODE(os.stat(tmp_path / "secret.key").st_mode) == 0o600
    assert operator_key(s) == k1  # read back, not made again
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".secret.key")]


def test_env_key_wins_and_passphrases_are_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = os.urandom(32)
    monkeypatch.setenv("MAILFLOW_SECRET_KEY", base64.urlsafe_b64encode(raw).decode().rstrip("="))
    assert operator_key(Settings(data_dir=tmp_path)) == raw
    assert not (tmp_path / "secret.key").exists()
    monkeypatch.setenv("MAILFLOW_SECRET_KEY", "a passphrase")
    assert len(operator_key(Settings(data_dir=tmp_path))) == 32


def test_seal_round_trip_and_refusals() -> None:
    k, other = os.urandom(32), os.urandom(32)
    sealed = seal(k, b"-----BEGIN RSA PRIVATE KEY-----secret", b"dkim|a.test|s1")
    assert b"secret" not in sealed.encode() and sealed.startswith(f"v1:{key_id(k)}:")
    assert unseal(k, sealed, b"dkim|a.test|s1") == b"-----BEGIN RSA PRIVATE KEY-----secret"
    with pytest.raises(SealError, match="another operator key"):
        unseal(other, sealed, b"dkim|a.test|s1")
    with pytest.raises(SealError, match="moved to another name"):
        unseal(k, sealed, b"dkim|b.test|s1")
    with pytest.raises(SealError, match="not a sealed value"):
        unseal(k, "garbage", b"")
