"""One SMTP transaction with command pipelining (RFC 2920), on an aiosmtplib connection.

A server that offers PIPELINING gets MAIL FROM, every RCPT TO and DATA in one write;
their replies are read back in order, then the body goes out and its reply is read:
two round trips and two writes per message instead of aiosmtplib's one per command
(four for one recipient), which is what Postfix does. On loopback the writes were a
third of the deliver stage's CPU (py-spy, docs/BENCHMARKS.md, session 12); against a
remote MX the two saved round trips are most of a message's latency.

aiosmtplib reads one reply per command it sent and drops what arrives before it
asks (`SMTPProtocol.data_received`), so it cannot read pipelined replies. For the
transaction the connection's transport is lent to `_Replies`, which keeps every
reply in order, and given back to aiosmtplib's protocol afterwards; the connection
(TLS included) and everything around the transaction stay aiosmtplib's.

`transaction` returns the replies as they came (`Replies`); what they mean for each
recipient is `mailflow.mta.smtp.pipelined_outcomes`' decision.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from aiosmtplib.response import SMTPResponse

MAX_LINE = 8192  # a reply line longer than this is not SMTP (RFC 5321 allows 512)
CLOSING = 421  # "service not available, closing transmission channel"


@dataclass
class Replies:
    """The server's replies to one pipelined transaction, in the order asked: MAIL's,
    each RCPT's, DATA's (None only while unread), and `final`, the reply to the
    body's end, None when no body went out (DATA refused, or nothing accepted)."""

    mail: SMTPResponse
    rcpts: list[SMTPResponse] = field(default_factory=list)
    data: SMTPResponse | None = None
    final: SMTPResponse | None = None


class _Replies(asyncio.Protocol):
    """The transport's protocol while it is lent: complete replies, kept in order."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.replies: deque[SMTPResponse | BaseException] = deque()
        self.lines: list[bytes] = []
        self.waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buffer.extend(data)
        while (end := self.buffer.find(b"\n")) != -1:
            line = bytes(self.buffer[:end + 1])
            del self.buffer[:end + 1]
            if len(line) > MAX_LINE or not line[:3].isdigit():
                text = line[:80].decode("utf-8", "replace").strip()
                self.replies.append(aiosmtplib.SMTPResponseException(-1, f"Malformed SMTP reply: {text}"))
                continue
            self.lines.append(line)
            if line[3:4] != b"-":  # the reply's last line (as aiosmtplib joins them)
                text = "\n".join(ln[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape")
                                 for ln in self.lines)
                self.replies.append(SMTPResponse(int(line[:3]), text))
                self.lines = []
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self.replies.append(lost)
        self._wake()

    def eof_received(self) -> bool:
        self.replies.append(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        self._wake()
        return False

    async def next(self, within: float) -> SMTPResponse:
        """The next reply, in the order the commands went out."""
        while not self.replies:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.waiter, within)
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from None
            finally:
                self.waiter = None
        reply = self.replies.popleft()
        if isinstance(reply, BaseException):
            if isinstance(reply, aiosmtplib.SMTPServerDisconnected):
                self.replies.appendleft(reply)  # every later read fails the same way
            raise reply
        return reply


def wire_body(body: bytes) -> bytes:
    """The message as DATA carries it: CRLF line ends, leading dots doubled, the end
    line (as aiosmtplib sends it)."""
    return _stuffed(normalize_message_line_endings(body))


def _stuffed(normalized: bytes) -> bytes:
    return PERIOD_REGEX.sub(b"..", normalized) + b".\r\n"


async def transaction(smtp: aiosmtplib.SMTP, sender: str, rcpts: list[str], body: bytes,
                      options: list[str], within: float) -> Replies:
    """MAIL, RCPT and DATA in one write on `smtp`'s connection, their replies, then the
    body if DATA was answered 354 and a recipient was accepted. The envelope is left
    for the caller to reset where it failed (RSET goes through aiosmtplib again).
    Raises aiosmtplib's SMTPServerDisconnected if the connection goes, and
    SMTPReadTimeoutError if a reply does not come `within` seconds."""
    from aiosmtplib.smtp import quote_address  # the cached copy (mailflow.mta.smtp)

    protocol: Any = smtp.protocol
    transport: Any = protocol.transport if protocol is not None else None
    if transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    enc = "utf-8" if any(o.upper() == "SMTPUTF8" for o in options) else "ascii"
    normalized = normalize_message_line_endings(body)
    wire = _stuffed(normalized)
    if smtp.supports_extension("size"):
        # RFC 1870: the octets as DATA carries them, without the added dots and end line.
        options = [f"SIZE={len(normalized)}", *options]
    opts = b"".join(b" " + o.encode("ascii") for o in options)
    commands = [b"MAIL FROM:" + quote_address(sender).encode(enc) + opts + b"\r\n"]
    commands += [b"RCPT TO:" + quote_address(r).encode(enc) + b"\r\n" for r in rcpts]
    commands.append(b"DATA\r\n")
    replies = _Replies()
    transport.set_protocol(replies)
    try:
        transport.write(b"".join(commands))
        # Every command gets its reply, even after a refused MAIL (RFC 2920 3.1: the
        # server answers each one), so the connection stays in step for the next use;
        # but a 421 is the server closing, and nothing after it comes.
        out = Replies(mail=await replies.next(within))
        if out.mail.code == CLOSING:
            return out
        for _ in rcpts:
            out.rcpts.append(await replies.next(within))
            if out.rcpts[-1].code == CLOSING:
                return out
        out.data = await replies.next(within)
        if out.data.code == CLOSING:
            return out
        accepted = out.mail.code == 250 and any(r.code in (250, 251) for r in out.rcpts)
        if out.data.code == 354:
            # With no recipient accepted a 354 still wants the data's end: an empty
            # message, which the server then refuses (RFC 2920 3.1).
            transport.write(wire if accepted else b".\r\n")
            final = await replies.next(within)
            out.final = final if accepted else None
        return out
    finally:
        if not transport.is_closing():
            transport.set_protocol(protocol)
