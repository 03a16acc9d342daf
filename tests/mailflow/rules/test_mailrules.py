import pytest

from mailflow.rules.mailrules import (
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
    ("user@xn--exmple-cua.com", "user@xn--exmple-cua.com"),  # ASCII stays ASCII (issue 19)
    ("user@ExÄmple.com", "user@exämple.com"),
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


# ---- issue 19: one strict reading of the header section ---------------------------------
def test_header_fields_read_obsolete_syntax_as_rfc_5322_does():
    from mailflow.rules.mailrules import header_fields

    raw = b"From: a@x.test\r\nTo: b@y.test,\r\n\tc@y.test\r\nFrom : ceo@f.test\r\n\r\nFrom: body@x.test\r\n"
    fields, problems = header_fields(raw)
    assert [(f.name, f.value) for f in fields] == [
        ("From", b" a@x.test\r\n"), ("To", b" b@y.test,\r\n\tc@y.test\r\n"), ("From", b" ceo@f.test")]
    assert [raw[f.start:f.end] for f in fields][1] == b"To: b@y.test,\r\n\tc@y.test\r\n"
    assert {p.field for p in problems} == {"from"} and len(problems) == 2
    assert header_fields(GOOD) == (header_fields(GOOD)[0], [])


def _sections(n: int, seed: int) -> list[bytes]:
    """Generated header sections: folded, repeated, empty and 8-bit values, both
    line ends, and lines that are not fields."""
    import random

    rnd = random.Random(seed)
    names = ["From", "To", "Cc", "Subject", "X-Thing", "Date", "Message-ID", "from", "TO"]
    values = ["a@b.test", " <x@y.test>", "  spaced  ", "héllo wörld", "", " ", "=?utf-8?q?x?=",
              "a:b:c", "tab\there"]
    out = []
    for _ in range(n):
        sep = rnd.choice(["\r\n", "\n"])
        lines = []
        for _ in range(rnd.randint(1, 6)):
            lines.append(rnd.choice(names) + rnd.choice([":", ":", ":", " :", ""]) + rnd.choice(values))
            if rnd.random() < 0.3:
                lines.append(rnd.choice([" more", "\tmore", "  ", " x: y"]))
        if rnd.random() < 0.1:
            lines.insert(rnd.randrange(len(lines) + 1), rnd.choice([" lead", "From x@y Mon", ":noname"]))
        out.append((sep.join(lines) + sep + sep + "From: body@x.test" + sep).encode())
    return out


def test_headers_read_every_field_as_email_s_compat32_parser_does():
    from email import policy
    from email.parser import HeaderParser

    from mailflow.rules.mailrules import header_block, parse_headers

    agreed = 0
    for raw in _sections(3000, seed=13):
        headers = parse_headers(raw)
        if headers.problems:
            continue  # refused for them; nothing reads its fields
        theirs = HeaderParser(policy=policy.compat32).parsestr(
            header_block(raw).decode("utf-8", "replace") + "\r\n\r\n")
        assert not theirs.defects, raw
        assert headers.items() == list(theirs.items()), raw
        for name in ("From", "to", "CC", "Subject", "X-Missing"):
            assert headers.get(name) == theirs.get(name), (raw, name)
            assert headers.get_all(name) == theirs.get_all(name), (raw, name)
        agreed += 1
    assert agreed > 300  # enough sections without a problem to mean something


def test_check_message_refuses_what_the_strict_reading_refuses():
    obs = b"From: a@x.test\r\nTo: b@y.test\r\nFrom : ceo@f.test\r\n\r\nb"
    assert "bad_headers" in codes(check_message("a@x.test", ["b@y.test"], obs, max_bytes=10**6, max_recipients=10))
    bad_utf8 = b"From: \xffa@x.test\r\nTo: b@y.test\r\n\r\nb"
    assert "bad_headers" in codes(check_message("a@x.test", ["b@y.test"], bad_utf8, max_bytes=10**6,
                                                max_recipients=10))


def test_mailbox_key_folds_the_local_part_and_the_domain_form():
    from mailflow.rules.mailrules import mailbox_key

    assert mailbox_key("VICTIM@Mailflow.TEST") == mailbox_key("victim@mailflow.test") == "victim@mailflow.test"
    assert mailbox_key("x@xn--bcher-kva.test") == mailbox_key("X@bücher.test")
    with pytest.raises(AddressError):
        mailbox_key("../../victim@mailflow.test/messages")


@pytest.mark.parametrize("sep", ["\v", "\f", "\x1c", "\x85", "\u2028", "\u2029", "\r", "\n", "\0"])
def test_addresses_and_header_values_refuse_every_line_separator(sep):
    from mailflow.rules.mailrules import bad_header_value

    assert bad_header_value(f"a{sep}b")
    with pytest.raises(AddressError):
        normalize_address(f"a{sep}@x.test")


def test_the_domain_check_is_cached_and_still_refuses_every_time():
    import sys

    domain_check = sys.modules["email_validator.validate_email"].validate_email_domain_name
    domain_check.cache_clear()
    assert normalize_address("one@Cached-Domain.test") == "one@cached-domain.test"
    assert normalize_address("two@cached-domain.test") == "two@cached-domain.test"
    info = domain_check.cache_info()
    assert info.misses == 2 and info.hits == 0  # the domain as written is the key
    assert normalize_address("three@cached-domain.test") == "three@cached-domain.test"
    assert domain_check.cache_info().hits == 1
    for local in ("a", "b"):  # a refusal is never remembered as an answer
        with pytest.raises(AddressError):
            normalize_address(f"{local}@-bad-.test")
