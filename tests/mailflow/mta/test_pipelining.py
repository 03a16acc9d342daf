"""Pipelined transactions (RFC 2920, mailflow.mta.pipelining) through `Pool.send`: a real
aiosmtpd peer that offers PIPELINING (the harness's scripted peer: ``reject*`` local
parts get 550, ``defer*`` 451), and a raw TCP peer that shows what went out in one
write; and the replies-to-outcomes decision on its own."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiosmtplib.response import SMTPResponse
from harness import ScriptedPeer

from mailflow.mta.pipelining import Replies, wire_body
from mailflow.mta.smtp import Pool, pipelined_outcomes
from mailflow.rules.delivery import DELIVERED, PERMANENT, TEMPORARY

MSG = b"From: a@mailflow.test\r\nTo: b@peer.test\r\nSubject: t\r\n\r\nhello\r\n.starts with a dot\r\n"


class PipeliningPeer(ScriptedPeer):
    """The scripted peer (which offers PIPELINING), counting EHLOs."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.ehlos = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: ANN001
        self.ehlos += 1
        return await super().handle_EHLO(server, session, envelope, hostname, responses)


@pytest.fixture
def peer() -> Any:
    p = PipeliningPeer().start()
    yield p
    p.stop()


async def _send(pool: Pool, port: int, rcpts: list[str], body: bytes = MSG) -> list[Any]:
    return await pool.send("127.0.0.1", port, "a@mailflow.test", rcpts, body)


async def test_a_pipelined_transaction_delivers_every_accepted_recipient(peer: PipeliningPeer) -> None:
    pool = Pool(ehlo="mailflow.test", timeout=5, tls="off")
    try:
        out = await _send(pool, peer.port, ["b@peer.test", "c@peer.test"])
        assert [(o.recipient, o.kind, o.code) for o in out] == [
            ("b@peer.test", DELIVERED, 250), ("c@peer.test", DELIVERED, 250)]
        assert out[0].reply == "2.0.0 queued by scripted peer"
        (mail_from, rcpts, content, _), = peer.messages
        assert (mail_from, rcpts) == ("a@mailflow.test", ["b@peer.test", "c@peer.test"])
        assert content == MSG  # the leading dot doubled on the wire and undone by the peer

        # Refused and deferred recipients keep their own replies; the others go, and
        # the connection stays in step for the next message (one EHLO for all three).
        out = await _send(pool, peer.port, ["reject-x@peer.test", "b@peer.test", "defer-y@peer.test"])
        assert [(o.kind, o.code) for o in out] == [(PERMANENT, 550), (DELIVERED, 250), (TEMPORARY, 451)]
        assert out[0].reply.startswith("550 5.1.1 <reject-x@peer.test>")
        assert peer.messages[-1][1] == ["b@peer.test"]
        out = await _send(pool, peer.port, ["reject-x@peer.test", "defer-y@peer.test"])
        assert [(o.kind, o.code) for o in out] == [(PERMANENT, 550), (TEMPORARY, 451)]
        out = await _send(pool, peer.port, ["c@peer.test"])
        assert [(o.kind, o.code) for o in out] == [(DELIVERED, 250)]
        assert len(peer.messages) == 3 and peer.ehlos == 1
    finally:
        await pool.close()


async def test_a_refused_end_of_data_is_about_every_recipient() -> None:
    peer = PipeliningPeer(fail_first=1).start()  # 451 to the first message's end of data
    pool = Pool(ehlo="mailflow.test", timeout=5, tls="off")
    try:
        out = await _send(pool, peer.port, ["b@peer.test", "c@peer.test"])
        assert [(o.kind, o.code) for o in out] == [(TEMPORARY, 451), (TEMPORARY, 451)]
        assert out[0].reply == "451 4.3.0 scripted failure 1"
        out = await _send(pool, peer.port, ["b@peer.test"])  # the same connection, reset
        assert [(o.kind, o.code) for o in out] == [(DELIVERED, 250)]
    finally:
        await pool.close()
        peer.stop()


class RawPeer:
    """A TCP peer speaking just enough SMTP, keeping every chunk it read: what the
    client wrote at once arrives as one chunk on loopback."""

    def __init__(self, after_data: bytes = b"250 2.0.0 queued\r\n", mail_reply: bytes = b"250 ok\r\n") -> None:
        self.chunks: list[bytes] = []
        self.after_data, self.mail_reply = after_data, mail_reply
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw.test ESMTP\r\n")
        self.chunks.append(await reader.readuntil(b"\r\n"))  # EHLO
        writer.write(b"250-raw.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        envelope = await reader.read(65536)
        self.chunks.append(envelope)
        rcpts = envelope.count(b"RCPT TO:")
        writer.write(self.mail_reply + b"250 ok\r\n" * rcpts + b"354 go ahead\r\n")
        if self.mail_reply.startswith(b"421"):
            await writer.drain()
            writer.close()
            return
        self.chunks.append(await reader.readuntil(b"\r\n.\r\n"))
        writer.write(self.after_data)
        await writer.drain()
        self.chunks.append(await reader.read(65536))  # RSET or QUIT, or the end
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_mail_every_rcpt_and_data_go_out_in_one_write_and_the_body_in_another() -> None:
    raw = RawPeer()
    port = await raw.start()
    pool = Pool(ehlo="mailflow.test", timeout=5, tls="off")
    try:
        out = await _send(pool, port, ["b@peer.test", "c@peer.test"])
        assert [(o.kind, o.code, o.reply) for o in out] == [(DELIVERED, 250, "2.0.0 queued")] * 2
        assert raw.chunks[1] == (b"MAIL FROM:<a@mailflow.test>\r\n"
                                 b"RCPT TO:<b@peer.test>\r\nRCPT TO:<c@peer.test>\r\nDATA\r\n")
        assert raw.chunks[2] == wire_body(MSG)
    finally:
        await pool.close()
        await raw.stop()


async def test_a_server_closing_with_421_is_a_disconnection_and_the_mail_waits() -> None:
    raw = RawPeer(mail_reply=b"421 4.3.2 shutting down\r\n")
    port = await raw.start()
    pool = Pool(ehlo="mailflow.test", timeout=5, tls="off")
    try:
        out = await _send(pool, port, ["b@peer.test"])
        assert [o.kind for o in out] == [TEMPORARY]
        assert "421 4.3.2 shutting down" in out[0].reply
    finally:
        await pool.close()
        await raw.stop()


def _r(code: int, text: str = "x") -> SMTPResponse:
    return SMTPResponse(code, text)


def test_replies_become_the_outcomes_the_unpipelined_path_gives() -> None:
    rc = ["a@x.test", "b@x.test"]
    ok = Replies(_r(250), [_r(250), _r(250)], _r(354), _r(250, "queued as 1"))
    out, reset = pipelined_outcomes(ok, rc, "mx")
    assert [(o.kind, o.code, o.reply) for o in out] == [(DELIVERED, 250, "queued as 1")] * 2 and not reset
    # MAIL refused: about every recipient, whatever RCPT said after it.
    out, reset = pipelined_outcomes(Replies(_r(550, "5.7.1 no"), [_r(503), _r(503)], _r(503)), rc, "mx")
    assert [(o.kind, o.code, o.reply) for o in out] == [(PERMANENT, 550, "550 5.7.1 no")] * 2 and reset
    # Every RCPT refused: each its own reply; no body went out.
    out, reset = pipelined_outcomes(Replies(_r(250), [_r(550), _r(452)], _r(554)), rc, "mx")
    assert [(o.kind, o.code) for o in out] == [(PERMANENT, 550), (TEMPORARY, 452)] and reset
    # One refused, DATA refused: DATA's reply for every recipient.
    out, reset = pipelined_outcomes(Replies(_r(250), [_r(250), _r(550)], _r(451)), rc, "mx")
    assert [(o.kind, o.code) for o in out] == [(TEMPORARY, 451)] * 2 and reset
    # One refused, the rest delivered.
    out, reset = pipelined_outcomes(Replies(_r(250), [_r(550), _r(250)], _r(354), _r(250)), rc, "mx")
    assert [(o.kind, o.code) for o in out] == [(PERMANENT, 550), (DELIVERED, 250)] and not reset
    # The end of data refused.
    out, reset = pipelined_outcomes(Replies(_r(250), [_r(250), _r(250)], _r(354), _r(554)), rc, "mx")
    assert [(o.kind, o.code) for o in out] == [(PERMANENT, 554)] * 2 and reset
    with pytest.raises(Exception, match="421"):
        pipelined_outcomes(Replies(_r(250), [_r(421), _r(421)], _r(421)), rc, "mx")


async def test_pipelining_over_starttls(tmp_path: Any) -> None:
    # The transport lent for the transaction is the TLS one after STARTTLS.
    from testca import TestCA, TlsPeer

    ca = TestCA(tmp_path)
    peer = TlsPeer(ca.server_context(["mx.good.test"]), pipelining=True).start()
    pool = Pool(ehlo="mailflow.test", timeout=5, tls="required", ca_file=str(ca.ca_file))
    try:
        for _ in range(2):
            out = await pool.send("127.0.0.1", peer.port, "a@mailflow.test", ["b@good.test"], MSG,
                                  server_name="mx.good.test")
            assert [(o.kind, o.code) for o in out] == [(DELIVERED, 250)], out
            assert out[0].tls["verified"] is True
        assert peer.tls_flags == [True, True] and peer.connections == 2  # EHLO before and after STARTTLS
        assert [m[2] for m in peer.messages] == [MSG, MSG]
    finally:
        await pool.close()
        peer.stop()
