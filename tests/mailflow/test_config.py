import pytest

from mailflow.config import Settings, parse_duration, parse_rate, parse_routes, parse_size


def test_durations():
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2m") == 120
    assert parse_duration("5d") == 5 * 86400
    assert parse_duration("7") == 7
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


def test_rate_size_routes():
    assert parse_rate("100/60s") == (100, 60.0)
    assert parse_size("25MiB") == 25 * 1024 * 1024
    assert parse_routes("example.com=127.0.0.1:2525, *=[::1]:25") == {
        "example.com": ("127.0.0.1", 2525), "*": ("::1", 25)}
    with pytest.raises(ValueError, match="bad SMTP route"):
        parse_routes("example.com")


def test_from_env(monkeypatch):
    monkeypatch.setenv("MAILFLOW_RETRY_SCHEDULE", "10ms,20ms")
    monkeypatch.setenv("MAILFLOW_LOCAL_DOMAINS", "A.test, b.test")
    monkeypatch.setenv("MAILFLOW_SCAN_FAILURE", "open")
    s = Settings.from_env()
    assert s.retry_schedule == (0.01, 0.02)
    assert s.local_domains == frozenset({"a.test", "b.test"})
    assert s.is_local("x@B.TEST") and not s.is_local("x@c.test")
    monkeypatch.setenv("MAILFLOW_SCAN_FAILURE", "maybe")
    with pytest.raises(ValueError, match="SCAN_FAILURE"):
        Settings.from_env()
