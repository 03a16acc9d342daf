"""One-click unsubscribe tokens, links and headers; the server key files."""

from __future__ import annotations

import os
import stat
from email import message_from_bytes, policy
from pathlib import Path

import pytest

from mailflow import keyfile
from mailflow.config import Settings
from mailflow.rules.unsubscribe import links_for, make_token, read_token, with_unsubscribe_headers

KEY = b"k" * 32


def test_token_round_trip_and_case() -> None:
    t = make_token(KEY, "Shop.Example", "Bob@Remote.Test")
    assert read_token(KEY, t) == ("shop.example", "bob@remote.test")


@pytest.mark.parametrize("mangle", [
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # the mac altered
    lambda t: "Z" + t[1:],  # the payload altered
    lambda t: t.split(".")[0],  # no mac
    lambda t: "." + t.split(".")[1],  # no payload
    lambda t: "",
    lambda t: "not a token at all",
])
def test_altered_or_forged_tokens_are_refused(mangle) -> None:  # noqa: ANN001
    assert read_token(KEY, mangle(make_token(KEY, "shop.example", "bob@remote.test"))) is None


def test_token_under_another_key_is_refused() -> None:
    assert read_token(b"x" * 32, make_token(KEY, "shop.example", "bob@remote.test")) is None


def test_links_per_remote_recipient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILFLOW_PUBLIC_URL", "https://mail.example/")
    monkeypatch.setenv("MAILFLOW_UNSUBSCRIBE_SECRET", "s3cret")
    monkeypatch.setenv("MAILFLOW_UNSUBSCRIBE_MAILTO", "unsub@shop.example")
    s = Settings(data_dir=tmp_path, local_domains=frozenset({"mailflow.test"}))
    links = links_for(s, "news@shop.example", ["a@remote.test", "b@remote.test", "me@mailflow.test"])
    assert set(links) == {"a@remote.test", "b@remote.test"}  # local mail needs none
    a = links["a@remote.test"]
    assert a.startswith("<https://mail.example/v1/unsubscribe/")
    assert a.endswith(">, <mailto:unsub@shop.example?subject=unsubscribe>")
    token = a[1:].split(">")[0].rsplit("/", 1)[1]
    assert read_token(b"s3cret", token) == ("shop.example", "a@remote.test")
    assert links["a@remote.test"] != links["b@remote.test"]
    monkeypatch.setenv("MAILFLOW_UNSUBSCRIBE_MAILTO", "bad>, <mailto:x@y")
    assert "mailto" not in links_for(s, "news@shop.example", ["a@remote.test"])["a@remote.test"]


def test_headers_prepended() -> None:
    body = b"From: a@x.test\r\nSubject: hi\r\n\r\nhello\r\n"
    out = with_unsubscribe_headers(body, "<https://m.example/v1/unsubscribe/t>")
    msg = message_from_bytes(out, policy=policy.default)
    assert msg["List-Unsubscribe"] == "<https://m.example/v1/unsubscribe/t>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert out.endswith(body)
    assert with_unsubscribe_headers(body, None) == body


def test_keyfile_made_once_private_and_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secrets" / "x.key"
    first = keyfile.read_or_make(path)
    assert len(first) == 32 and keyfile.read_or_make(path) == first
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["x.key"]  # no temporary file left
    monkeypatch.setenv("MAILFLOW_X_SECRET", "from-env")
    assert keyfile.key(Settings(data_dir=tmp_path), "x", "MAILFLOW_X_SECRET") == b"from-env"
