"""A certificate authority made inside a test (``cryptography``), and TLS SMTP peers.

``TestCA(dir)`` writes its certificate to ``dir/ca.pem`` (what ``MAILFLOW_TLS_CA_FILE``
points at); ``ca.server_context(["mx.good.test"])`` is a server-side SSLContext whose
certificate names those hosts, optionally expired. ``TlsPeer`` is the harness's
``ScriptedPeer`` offering STARTTLS with such a context, recording whether each
accepted message came over TLS. ``LocalDns`` is a dnsmasq of the test's own on a free
port (the shared one on 5353 has only static records), restarted with new records
when a test publishes more. ``run_cli`` runs ``mailflow ...`` in a Stack's
environment (``domains add`` etc.). Imported by name (``from testca import ...``), like the
harness.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import ROOT, ScriptedPeer, free_port

from devtools.services import ServiceGroup, prepare_dnsmasq


class TestCA:
    """A throw-away CA: its key never leaves the test's temp dir."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, directory: Path, name: str = "mailflow test CA") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = self.dir / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._n = 0

    def issue(self, names: list[str], expired: bool = False) -> tuple[Path, Path]:
        """A server certificate for ``names`` (DNS names or IP addresses): (cert.pem, key.pem)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        start, end = ((now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if expired
                      else (now - dt.timedelta(hours=1), now + dt.timedelta(days=7)))
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self._n += 1
        cert_file, key_file = self.dir / f"server{self._n}.pem", self.dir / f"server{self._n}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_file, key_file

    def server_context(self, names: list[str], expired: bool = False) -> ssl.SSLContext:
        cert_file, key_file = self.issue(names, expired)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert_file, key_file)
        return ctx


class TlsPeer(ScriptedPeer):
    """A ScriptedPeer offering STARTTLS with ``tls_context``; ``tls_flags`` says, per
    accepted message, whether it came over TLS. Without PIPELINING unless asked
    (``pipelining=True``), so the TLS tests keep aiosmtplib's one-command path."""

    def __init__(self, tls_context: ssl.SSLContext | None, host: str = "127.0.0.1", port: int = 0,
                 **kw: Any) -> None:
        self.tls_context, self.host = tls_context, host
        self.tls_flags: list[bool] = []
        self.connections = 0  # EHLOs seen: a host never contacted has none
        self._fixed_port = port
        kw.setdefault("pipelining", False)
        super().__init__(**kw)
        if port:
            self.port = port
            self.controller = self._controller()

    def _controller(self) -> Any:
        from aiosmtpd.controller import Controller

        kw: dict[str, Any] = {"tls_context": self.tls_context} if self.tls_context else {}
        return Controller(self, hostname=self.host, port=self.port, enable_SMTPUTF8=True,
                          decode_data=False, **kw)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: ANN001
        self.connections += 1
        return await super().handle_EHLO(server, session, envelope, hostname, responses)

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001
        reply = await super().handle_DATA(server, session, envelope)
        if reply.startswith("250"):
            self.tls_flags.append(session.ssl is not None)
        return reply


class PolicyServer:
    """An HTTPS server for ``/.well-known/mta-sts.txt`` (MTA-STS policy host) in a thread."""

    def __init__(self, context: ssl.SSLContext, policy: str) -> None:
        import http.server
        import threading

        body = policy.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path != "/.well-known/mta-sts.txt":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_a: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> PolicyServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class LocalDns:
    """A dnsmasq on 127.0.0.1:<free port> serving ``records`` (dnsmasq config lines).

    ``nameserver`` is what ``MAILFLOW_DNS`` takes. ``publish(more)`` adds records
    and restarts it (dnsmasq reads TXT and MX records only at start).
    """

    def __init__(self, directory: Path, records: str = "") -> None:
        self.dir, self.records, self.port = Path(directory), records, free_port()
        self.nameserver = f"127.0.0.1:{self.port}"
        self._group: ServiceGroup | None = None

    def start(self) -> LocalDns:
        self._group = ServiceGroup([prepare_dnsmasq(self.dir, self.records, port=self.port)],
                                   log=lambda _m: None)
        self._group.start(timeout=30)
        return self

    def publish(self, more: str) -> None:
        self.stop()
        self.records = self.records.rstrip("\n") + "\n" + more
        self.start()

    def stop(self) -> None:
        if self._group is not None:
            self._group.stop()
            self._group = None


def txt_record(name: str, value: str) -> str:
    """A dnsmasq ``txt-record`` line, the value cut into 255-byte strings (RFC 1035)."""
    parts = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
    return f"txt-record={name}," + ",".join(f'"{p}"' for p in parts)


def run_cli(stack: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """``mailflow ARGS`` with ``stack``'s environment (its topics, data dir, DNS)."""
    return subprocess.run([sys.executable, "-m", "mailflow.ops.cli", *args], env=stack.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
