"""mailflow.mta.dsn: bounces as RFC 3464 DSNs, read back with the stdlib email parser."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from mailflow.mta.dsn import (
    FailedRecipient,
    build_dsn,
    flatten_reply,
    is_bounce,
    parse_enhanced,
    split_headers,
    status_for_reply,
)

BODY_MARKER = "the secret quarterly figures"


def original(extra_headers: dict[str, str] | None = None) -> bytes:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = "Alice <alice@example.test>"
    msg["To"] = "Bob <bob@remote.test>, carol@remote.test"
    msg["Subject"] = "Quarterly figures"
    msg["Date"] = "Fri, 27 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = "<figures-1@example.test>"
    for name, value in (extra_headers or {}).items():
        msg[name] = value
    msg.set_content(f"Hello Bob,\n\n{BODY_MARKER}.\n")
    return msg.as_bytes()


FAILED = [
    FailedRecipient(
        address="bob@remote.test",
        status="5.1.1",
        diagnostic="550-5.1.1 The email account that you tried to reach does not exist.\r\n"
        "550 5.1.1 Please check the address.",
        remote_mta="mx1.remote.test",
    ),
    FailedRecipient(address="carol@remote.test", status="4.4.7"),
]


def dsn(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "original": original(),
        "envelope_from": "alice@example.test",
        "failed": FAILED,
        "reporting_mta": "mta.mailflow.test",
        "postmaster": "postmaster@mailflow.test",
        "message_id": "<dsn-1@mailflow.test>",
        "date": datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC),
        "arrival_date": datetime(2026, 11, 27, 10, 0, 5, tzinfo=UTC),
    }
    args.update(overrides)
    return build_dsn(**args)  # type: ignore[arg-type]


def test_dsn_top_level_headers() -> None:
    raw = dsn()
    msg = message_from_bytes(raw, policy=policy.default)
    assert msg["From"].addresses[0].addr_spec == "postmaster@mailflow.test"
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert str(msg["To"]) == "alice@example.test"
    assert str(msg["Subject"]) == "Undelivered Mail Returned to Sender"
    assert str(msg["Auto-Submitted"]) == "auto-replied"
    assert str(msg["Message-ID"]) == "<dsn-1@mailflow.test>"
    assert msg["Date"].datetime == datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)
    assert str(msg["In-Reply-To"]) == "<figures-1@example.test>"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_dsn_lines_are_crlf_and_short() -> None:
    raw = dsn()
    assert raw.endswith(b"\r\n")
    assert not re.search(rb"(?<!\r)\n", raw), "bare LF"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_dsn_delivery_status_fields() -> None:
    msg = message_from_bytes(dsn(original_envelope_id="env-42"), policy=policy.default)
    status = list(msg.iter_parts())[1]
    blocks = status.get_payload()
    assert len(blocks) == 3  # per-message + one per recipient
    per_message, bob, carol = blocks
    assert per_message["Reporting-MTA"] == "dns; mta.mailflow.test"
    assert per_message["Arrival-Date"] == "Fri, 27 Nov 2026 10:00:05 +0000"
    assert per_message["Original-Envelope-Id"] == "env-42"
    assert bob["Final-Recipient"] == "rfc822; bob@remote.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.remote.test"
    assert bob["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 The email account that you tried to reach does not exist."
        " Please check the address."
    )
    assert carol["Final-Recipient"] == "rfc822; carol@remote.test"
    assert carol["Status"] == "4.4.7"
    assert carol["Remote-MTA"] is None and carol["Diagnostic-Code"] is None


def test_dsn_human_part_lists_each_recipient() -> None:
    msg = message_from_bytes(dsn(), policy=policy.default)
    text = list(msg.iter_parts())[0].get_content()
    assert "mta.mailflow.test" in text
    assert "<bob@remote.test>: host mx1.remote.test said: 550 5.1.1 The email" in text
    assert "<carol@remote.test>: delivery failed (status 4.4.7)" in text
    assert "Quarterly figures" in text


def test_dsn_returns_original_headers_not_body() -> None:
    msg = message_from_bytes(dsn(), policy=policy.default)
    part = list(msg.iter_parts())[2]
    returned = part.get_content()
    assert "Subject: Quarterly figures" in returned
    assert "Message-ID: <figures-1@example.test>" in returned
    assert BODY_MARKER not in returned
    assert BODY_MARKER.encode() not in dsn()
    headers = message_from_bytes(returned.encode(), policy=policy.default)
    assert str(headers["From"]) == "Alice <alice@example.test>"


def test_dsn_diagnostic_cannot_inject_headers() -> None:
    evil = FailedRecipient(
        address="bob@remote.test",
        status="5.7.1",
        diagnostic="550 5.7.1 no\r\nBcc: victim@example.test\r\n\r\nspam",
        remote_mta="mx.remote.test\r\nX-Evil: 1",
    )
    msg = message_from_bytes(dsn(failed=[evil]), policy=policy.default)
    assert msg["Bcc"] is None
    block = list(msg.iter_parts())[1].get_payload()[1]
    assert block["X-Evil"] is None and block["Bcc"] is None
    assert block["Diagnostic-Code"] == "smtp; 550 5.7.1 no Bcc: victim@example.test spam"


def test_dsn_refuses_to_bounce_a_bounce_and_bad_status() -> None:
    with pytest.raises(ValueError, match="null reverse-path"):
        dsn(envelope_from="<>")
    with pytest.raises(ValueError, match="status"):
        dsn(failed=[FailedRecipient("bob@remote.test", "550")])
    with pytest.raises(ValueError):
        dsn(failed=[])


def test_dsn_with_8bit_original_headers() -> None:
    orig = "Subject: Grüße\r\nFrom: jörg@example.test\r\n\r\nbody\r\n".encode()
    msg = message_from_bytes(
        dsn(original=orig, envelope_from="<j@example.test>"), policy=policy.default
    )
    assert str(msg["To"]) == "j@example.test"
    assert "Grüße" in list(msg.iter_parts())[2].get_content()


# --------------------------------------------------------------------------- is_bounce


def test_is_bounce() -> None:
    raw = dsn()
    headers, _ = split_headers(raw)
    assert is_bounce("postmaster@mailflow.test", headers)  # a DSN, whoever sends it
    assert is_bounce("", original())  # the null reverse-path
    assert is_bounce("<>", original())
    assert is_bounce(" <> ", b"")
    assert not is_bounce("alice@example.test", original())
    assert not is_bounce("alice@example.test", split_headers(original())[0])
    assert not is_bounce("alice@example.test", b"")


@pytest.mark.parametrize(
    ("header", "bounce"),
    [
        ("auto-generated", True),
        ("auto-replied", True),
        ("Auto-Notified; owner-email=x@example.test", True),
        ("no", False),
        ("No (comment)", False),
    ],
)
def test_is_bounce_auto_submitted(header: str, bounce: bool) -> None:
    raw = original({"Auto-Submitted": header})
    assert is_bounce("alice@example.test", raw) is bounce


def test_is_bounce_report_types() -> None:
    report = b'Content-Type: multipart/report; report-type="delivery-status"; boundary=x\r\n'
    assert is_bounce("mailer@example.test", report)
    report = b"Content-Type: Multipart/Report; boundary=x;\r\n Report-Type=Delivery-Status\r\n"
    assert is_bounce("mailer@example.test", report)
    mdn = b"Content-Type: multipart/report; report-type=disposition-notification; boundary=x\r\n"
    assert not is_bounce("alice@example.test", mdn)


# --------------------------------------------------------------------------- status codes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("550 5.1.1 user unknown", "5.1.1"),
        ("550-5.7.26 unauthenticated\r\n550 5.7.26 see docs", "5.7.26"),
        ("452 4.2.2 mailbox full", "4.2.2"),
        ("5.1.10 null MX", "5.1.10"),
        ("4.4.3 DNS timeout", "4.4.3"),
        ("250 2.0.0 OK queued", "2.0.0"),
        ("550 user unknown", None),
        ("550 user 5.1.1 unknown", None),
        ("550 5.1.1x nope", None),
        ("", None),
        ("connection refused", None),
    ],
)
def test_parse_enhanced(text: str, expected: str | None) -> None:
    assert parse_enhanced(text) == expected


@pytest.mark.parametrize(
    ("code", "enhanced", "temporary", "expected"),
    [
        (550, "5.1.1", False, "5.1.1"),  # the reply's own code wins
        (550, None, False, "5.0.0"),
        (554, None, False, "5.0.0"),
        (451, None, False, "4.0.0"),
        (None, None, False, "5.0.0"),  # no reply at all
        (None, "5.1.10", False, "5.1.10"),  # e.g. a PermanentDnsError reason
        (451, None, True, "4.4.7"),  # expired: delivery time expired (RFC 3463)
        (None, None, True, "4.4.7"),  # expired after connection failures
        (452, "4.2.2", True, "4.2.2"),  # the last reply's detail beats the generic code
        (550, "4.1.1", False, "5.1.1"),  # class made to agree with the reply code
        (550, "bogus", False, "5.0.0"),
    ],
)
def test_status_for_reply(
    code: int | None, enhanced: str | None, temporary: bool, expected: str
) -> None:
    assert status_for_reply(code, enhanced, temporary) == expected


def test_flatten_reply_and_split_headers() -> None:
    assert flatten_reply("550-5.1.1 a\r\n550-5.1.1 b\r\n550 5.1.1 c") == "550 5.1.1 a b c"
    assert flatten_reply("421 4.3.2 going away\n") == "421 4.3.2 going away"
    assert flatten_reply("") == ""
    assert split_headers(b"A: 1\r\nB: 2\r\n\r\nbody\r\n") == (b"A: 1\r\nB: 2\r\n", b"body\r\n")
    assert split_headers(b"A: 1\n\nbody") == (b"A: 1\n", b"body")
    assert split_headers(b"A: 1\r\n") == (b"A: 1\r\n", b"")


def test_dsn_carries_the_bounce_class() -> None:
    failed = [FailedRecipient(address="bob@remote.test", status="5.7.1", diagnostic="550 5.7.1 denied",
                              bounce_class="policy"), FailedRecipient(address="carol@remote.test", status="5.0.0")]
    msg = message_from_bytes(dsn(failed=failed), policy=policy.default)
    _, bob, carol = list(msg.iter_parts())[1].get_payload()
    assert bob["X-Mailflow-Bounce-Class"] == "policy"
    assert carol["X-Mailflow-Bounce-Class"] is None
