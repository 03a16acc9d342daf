"""Real clamd, rspamd and dnsmasq started by devtools.services (no fakes).

The session fixture starts them on their default loopback ports in a temp dir,
or reuses instances that already answer there (another test session, or
``python -m devtools.services up``).  Needs the Debian packages clamav,
clamav-daemon, rspamd and dnsmasq-base; without them the module is skipped,
except under CI (``CI`` set) where that is an error.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import sys
import time
import zipfile
from email import policy
from email.message import EmailMessage
from pathlib import Path

import clamd
import pytest

from devtools.services import (
    CLAMD_PORT,
    DEFAULT_DNS_CONF,
    DNS_PORT,
    EICAR,
    EICAR_SIGNATURE,
    RSPAMD_PORT,
    Service,
    ServiceGroup,
    check_installed,
    dns_query,
    ensure_running,
    prepare_dnsmasq,
    prepare_rspamd,
    rspamd_ping,
)

HOST = "127.0.0.1"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

MISSING = check_installed()
if MISSING and not os.environ.get("CI"):
    pytest.skip(f"scanner daemons not installed: {', '.join(MISSING)}", allow_module_level=True)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory):
    assert not MISSING, f"missing executables: {MISSING}"
    group = ensure_running(
        tmp_path_factory.mktemp("services"),
        dns_conf=DEFAULT_DNS_CONF,
        log=lambda m: print(m, file=sys.stderr),
    )
    yield
    if group is not None:
        group.stop()


# --------------------------------------------------------------------------- helpers


def instream(data: bytes, port: int = CLAMD_PORT) -> str:
    """clamd INSTREAM through python-clamd, the client the scan stage uses;
    returns clamd's reply line, e.g. 'stream: OK'."""
    status, name = clamd.ClamdNetworkSocket(HOST, port, timeout=30).instream(io.BytesIO(data))["stream"]
    return "stream: OK" if status == "OK" else f"stream: {name} {status}"


def message(
    body: str = "Hello Bob,\n\nthe figures are attached.\n\nAlice\n",
    attachment: bytes | None = None,
    filename: str = "file.bin",
    ctype: str = "application/octet-stream",
) -> bytes:
    msg = EmailMessage(policy=policy.SMTP)  # CRLF line ends, as on the wire
    msg["From"] = "Alice <alice@example.test>"
    msg["To"] = "Bob <bob@example.test>"
    msg["Subject"] = "Quarterly figures"
    msg["Date"] = "Fri, 27 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = "<figures-1@example.test>"
    msg.set_content(body)
    if attachment is not None:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(attachment, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def checkv2(data: bytes) -> dict:
    conn = http.client.HTTPConnection(HOST, RSPAMD_PORT, timeout=30)
    try:
        conn.request(
            "POST",
            "/checkv2",
            body=data,
            headers={"From": "alice@example.test", "Rcpt": "bob@example.test"},
        )
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200, body
    return json.loads(body)


def assert_eicar(reply: str) -> None:
    assert reply.startswith("stream: ") and reply.endswith(" FOUND"), reply
    name = reply.removeprefix("stream: ").removesuffix(" FOUND")
    assert name.startswith(EICAR_SIGNATURE), reply  # "Eicar-Test-Signature.UNOFFICIAL"


# --------------------------------------------------------------------------- clamd


def test_clamd_finds_eicar_plain(services) -> None:
    assert_eicar(instream(EICAR))


def test_clamd_finds_eicar_in_base64_mime_attachment(services) -> None:
    data = message(attachment=EICAR, filename="eicar.com")
    assert b"Content-Transfer-Encoding: base64" in data and EICAR not in data
    assert_eicar(instream(data))


def test_clamd_finds_eicar_in_zip_in_mime_attachment(services) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("docs/eicar.com", EICAR)
    data = message(attachment=buf.getvalue(), filename="docs.zip", ctype="application/zip")
    assert_eicar(instream(data))


def test_clamd_clean_message_ok(services) -> None:
    assert (
        instream(message(attachment=b"%PDF-1.4 harmless bytes\n" * 100, filename="a.pdf"))
        == "stream: OK"
    )


# --------------------------------------------------------------------------- rspamd


def test_rspamd_gtube_is_reject(services) -> None:
    res = checkv2(message(body=f"This is a test.\n{GTUBE}\n"))
    assert res["action"] == "reject", res
    assert "GTUBE" in res["symbols"]


def test_rspamd_clean_message_no_action(services) -> None:
    res = checkv2(message())
    assert res["action"] == "no action", res
    # offline config: no network-backed checks ran
    assert not any(s.startswith(("RBL_", "URIBL_", "FUZZY_", "R_SPF_")) for s in res["symbols"]), (
        res["symbols"]
    )


# --------------------------------------------------------------------------- dnsmasq


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_dnsmasq_answers_records_from_conf(services, tcp: bool) -> None:
    assert dns_query("a.mailflow.test", "A", HOST, DNS_PORT, tcp=tcp) == ("NOERROR", ["192.0.2.10"])
    rcode, mx = dns_query("example.test", "MX", HOST, DNS_PORT, tcp=tcp)
    assert rcode == "NOERROR" and sorted(mx) == ["10 mx1.example.test.", "20 mx2.example.test."]


def test_dnsmasq_null_mx(services) -> None:
    assert dns_query("nullmx.test", "MX", HOST, DNS_PORT) == ("NOERROR", ["0 ."])


def test_dnsmasq_unknown_name_is_nxdomain(services) -> None:
    assert dns_query("no-such-host.example.test", "A", HOST, DNS_PORT) == ("NXDOMAIN", [])
    assert dns_query("no-such-domain.test", "MX", HOST, DNS_PORT) == ("NXDOMAIN", [])


# --------------------------------------------------------------------------- ServiceGroup


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pgid_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def group_members(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after "(comm)": state ppid pgrp ...
            pids.append(int(stat.parent.name))
    return pids


def test_group_stops_forked_rspamd_workers(services, tmp_path: Path) -> None:
    port, ctl = free_port(), free_port()
    svc = prepare_rspamd(tmp_path / "rspamd", port=port, controller_port=ctl, workers=2)
    with ServiceGroup([svc], log=lambda m: None) as group:
        assert rspamd_ping(HOST, port) and rspamd_ping(HOST, ctl)
        pgid = group.services[0].proc.pid
        members = group_members(pgid)
        assert len(members) >= 4, members  # main, controller, 2 normal (+ hs_helper)
    assert not pgid_alive(pgid), group_members(pgid)
    assert not rspamd_ping(HOST, port)


def test_group_reports_daemon_that_dies(tmp_path: Path) -> None:
    svc = prepare_dnsmasq(tmp_path, "no-such-dnsmasq-option=1\n", port=free_port())
    with pytest.raises(
        RuntimeError, match=r"(?s)dnsmasq exited .*bad option at line 1 of .*records.conf"
    ):
        ServiceGroup([svc], log=lambda m: None).start(timeout=20)


def test_group_times_out_and_cleans_up(tmp_path: Path) -> None:
    svc = Service(
        name="sleeper",
        argv=["sleep", "60"],
        port=free_port(),
        data_dir=tmp_path,
        ready=lambda: False,
    )
    group = ServiceGroup([svc], log=lambda m: None)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="sleeper not ready"):
        group.start(timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert svc.proc is not None and svc.proc.returncode == -signal.SIGTERM


def test_rspamd_and_its_workers_die_when_their_starter_is_killed(services, tmp_path: Path) -> None:
    """The process that started the daemons (`devtools.services up` under `mailflow up`)
    is SIGKILLed: rspamd's main process gets its death signal (SIGTERM) and takes its
    forked workers along; nothing of the group is left after 10 s."""
    import subprocess
    import textwrap

    port, ctl = free_port(), free_port()
    script = tmp_path / "starter.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from pathlib import Path
        from devtools.services import ServiceGroup, prepare_rspamd
        svc = prepare_rspamd(Path({str(tmp_path / "rspamd")!r}), port={port}, controller_port={ctl},
                             workers=2)
        group = ServiceGroup([svc], log=lambda m: None)
        group.start(60)
        print(svc.proc.pid, flush=True)
        time.sleep(300)
    """))
    root = Path(__file__).resolve().parents[2]
    starter = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(root)}, start_new_session=True)
    pgid = 0
    try:
        assert starter.stdout is not None
        pgid = int(starter.stdout.readline())
        members = group_members(pgid)
        assert len(members) >= 4, members  # main, controller, 2 normal (+ hs_helper)
        starter.kill()
        starter.wait(10)
        deadline = time.monotonic() + 10
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_members(pgid), group_members(pgid)
        assert not rspamd_ping(HOST, port)
    finally:
        if starter.poll() is None:
            starter.kill()
        if pgid and group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)
