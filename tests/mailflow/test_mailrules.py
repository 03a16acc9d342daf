import pytest

from mailflow.mailrules import (
    AddressError,
    check_message,
    group_by_domain,
    normalize_address,
    split_recipients,
)

GOOD = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: s\r\n\r\nbody\r\n"


def codes(problems):
    return [p.code for p in problems]


@pytest.mark.parametrize("addr,norm", [
    ("Bob@Example.COM", "Bob@example.com"),
    ("üñí@exämple.com", "üñí@exämple.com"),
    ("user@xn--exmple-cua.com", "user@exämple.com"),
    ("a@mailflow.local", "a@mailflow.local"),
])
def test_normalize_accepts(addr, norm):
    assert normalize_address(addr) == norm


@pytest.mark.parametrize("addr", ["", "plain", "a@", "@b.com", "a b@c.com", "a@b.com\r\nBcc: x@y.z",
                                  "a@-bad-.com", "a@host.invalid", "x" * 400 + "@a.com"])
def test_normalize_refuses(addr):
    with pytest.raises(AddressError):
        normalize_address(addr)


def test_good_message_passes():
    assert check_message("a@x.test", ["b@y.test"], GOOD, max_bytes=10_000, max_recipients=10) == []


def test_size_and_recipient_limits():
    assert "too_large" in codes(check_message("a@x.test", ["b@y.test"], GOOD, max_bytes=10, max_recipients=10))
    many = [f"r{i}@y.test" for i in range(11)]
    assert "too_many_recipients" in codes(check_message("a@x.test", many, GOOD, max_bytes=10_000, max_recipients=10))
    assert "no_recipients" in codes(check_message("a@x.test", [], GOOD, max_bytes=10_000, max_recipients=10))


def test_header_rules():
    long_line = b"From: a@x.test\r\nSubject: " + b"x" * 1200 + b"\r\n\r\nb"
    assert "line_too_long" in codes(check_message("a@x.test", ["b@y.test"], long_line, max_bytes=10**6, max_recipients=10))
    bare_cr = b"From: a@x.test\r\nSubject: a\rBcc: evil@x.test\r\n\r\nb"
    assert "bare_cr" in codes(check_message("a@x.test", ["b@y.test"], bare_cr, max_bytes=10**6, max_recipients=10))
    no_from = b"To: b@y.test\r\n\r\nb"
    assert "bad_from_header" in codes(check_message("a@x.test", ["b@y.test"], no_from, max_bytes=10**6, max_recipients=10))
    two_from = b"From: a@x.test\r\nFrom: c@x.test\r\n\r\nb"
    assert "bad_from_header" in codes(check_message("a@x.test", ["b@y.test"], two_from, max_bytes=10**6, max_recipients=10))


def test_bad_envelope_addresses():
    assert "bad_sender" in codes(check_message("nope", ["b@y.test"], GOOD, max_bytes=10**6, max_recipients=10))
    assert "bad_recipient" in codes(check_message("a@x.test", ["b@"], GOOD, max_bytes=10**6, max_recipients=10))
    # the null reverse-path of a bounce is allowed
    assert check_message("", ["b@y.test"], GOOD, max_bytes=10**6, max_recipients=10) == []


def test_routing_splits_local_and_remote():
    local, remote = split_recipients(["a@mine.test", "b@Other.test", "c@MINE.test"], frozenset({"mine.test"}))
    assert local == ["a@mine.test", "c@MINE.test"]
    assert remote == ["b@Other.test"]
    assert group_by_domain(["a@x.test", "b@y.test", "c@X.test"]) == {"x.test": ["a@x.test", "c@X.test"], "y.test": ["b@y.test"]}
