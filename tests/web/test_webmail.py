"""The webmail page in a real browser: Debian's Chromium, headless, driven by Playwright.

Needs the Debian package `chromium` and the PyPI package `playwright` (its Python
side only: no browser download). Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import ScriptedPeer, Stack

CHROMIUM = os.environ.get("MAILFLOW_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
if not shutil.which(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@contextmanager
def open_page(browser, api: str) -> Iterator[object]:  # noqa: ANN001
    ctx = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(30000)
    pg.offsite = []  # requests leaving the API's origin: must stay empty
    pg.dialogs = []
    pg.on("request", lambda r: None if r.url.startswith((api, "data:", "blob:", "about:"))
          else pg.offsite.append(r.url))
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    try:
        yield pg
    finally:
        ctx.close()


@pytest.fixture
def page(browser, submission_stack: Stack):  # noqa: ANN001
    with open_page(browser, submission_stack.api) as pg:
        yield pg


@pytest.fixture(scope="module")
def outgoing(kafka: str, work_dir: Path) -> Iterator[tuple[Stack, ScriptedPeer]]:
    """Every stage, remote mail routed to an SMTP peer (scanning off: the scanners
    have their own tests, and this one is about the page)."""
    peer = ScriptedPeer().start()
    stack = Stack(work_dir, kafka, smtp_routes=f"*=127.0.0.1:{peer.port}", scanners="none",
                  rate_limit="1000/60s")
    try:
        yield stack.start(["ratelimit", "validate", "store", "scan", "sentfolder", "deliver", "retry",
                           "status"]), peer
    finally:
        stack.stop()
        peer.stop()


def shot(pg, name: str) -> None:  # noqa: ANN001
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"webmail-{name}.png"), full_page=True)


def sign_in(pg, api: str, token: str, address: str) -> None:  # noqa: ANN001
    pg.goto(api + "/")
    pg.get_by_label("Mailbox token").fill(token)
    pg.get_by_role("button", name="Sign in").click()
    sync_api.expect(pg.locator("#me")).to_have_text(f"Signed in as {address}")
    sync_api.expect(pg.get_by_role("heading", name="Inbox")).to_be_visible()


def test_sign_in_compose_with_attachment_send_and_read(page, submission_stack: Stack) -> None:  # noqa: ANN001
    s, pg = submission_stack, page
    me, them = f"w{uuid.uuid4().hex[:6]}@mailflow.test", f"x{uuid.uuid4().hex[:6]}@local.test"
    my_token, their_token = s.token(me), s.token(them)
    subject = f"webmail {uuid.uuid4().hex[:8]}"
    sign_in(pg, s.api, my_token, me)
    # the token lives in sessionStorage only
    assert pg.evaluate("sessionStorage.getItem('mailflow.token')") == my_token
    assert pg.evaluate("localStorage.length") == 0 and pg.context.cookies() == []

    pg.get_by_role("button", name="Compose").click()
    sync_api.expect(pg.locator("#c-from")).to_have_value(me)
    pg.locator("#c-to").fill(them)
    pg.locator("#c-subject").fill(subject)
    pg.locator("#c-text").fill("Hello from the browser.\nSecond line.")
    pg.locator("#c-files").set_input_files(
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"attached bytes \x00\x01\xff"}])
    pg.get_by_role("button", name="Send").click()
    # live state from the status API: accepted -> ... -> stored (local delivery)
    sync_api.expect(pg.locator("#send-state")).to_have_text("stored", timeout=60000)
    sync_api.expect(pg.locator("#send-recipients li")).to_have_text(f"{them}: stored")
    sync_api.expect(pg.locator("#send-timeline li").first).to_contain_text("accepted")
    shot(pg, "1-sent-status")

    pg.get_by_role("button", name="Sent").click()
    row = pg.locator("#list tbody tr", has_text=subject)
    for _ in range(30):  # the Sent copy is written by the store stage
        if row.count():
            break
        pg.wait_for_timeout(1000)
        pg.get_by_role("button", name="Refresh").click()
    sync_api.expect(row).to_have_count(1)
    sync_api.expect(row).to_contain_text(them)
    shot(pg, "2-sent-folder")

    pg.get_by_role("button", name="Sign out").click()
    assert pg.evaluate("sessionStorage.getItem('mailflow.token')") is None
    sign_in(pg, s.api, their_token, them)
    row = pg.locator("#list tbody tr", has_text=subject)
    sync_api.expect(row).to_have_count(1)
    row.get_by_role("link").click()
    sync_api.expect(pg.get_by_role("heading", name=subject)).to_be_visible()
    sync_api.expect(pg.locator("#msg-body pre")).to_contain_text("Hello from the browser.")
    with pg.expect_download() as dl:
        pg.get_by_role("button", name="Download notes.txt").click()
    assert dl.value.suggested_filename == "notes.txt"
    assert Path(dl.value.path()).read_bytes() == b"attached bytes \x00\x01\xff"
    shot(pg, "3-recipient-inbox")
    assert pg.offsite == [] and pg.dialogs == []


def test_rejected_send_shows_the_reason(page, submission_stack: Stack) -> None:  # noqa: ANN001
    s, pg = submission_stack, page
    me = f"r{uuid.uuid4().hex[:6]}@mailflow.test"
    sign_in(pg, s.api, s.token(me), me)
    pg.get_by_role("button", name="Compose").click()
    pg.locator("#c-to").fill("not an address")
    pg.locator("#c-text").fill("x")
    pg.get_by_role("button", name="Send").click()
    status = pg.locator("#send-status [data-state=refused]")
    sync_api.expect(status).to_contain_text("Not sent (400)")
    sync_api.expect(status).to_contain_text("to:")
    shot(pg, "4-rejected")


def test_html_mail_is_inert_and_remote_content_not_loaded(page, submission_stack: Stack) -> None:  # noqa: ANN001
    s, pg = submission_stack, page
    sender, me = f"h{uuid.uuid4().hex[:6]}@mailflow.test", f"v{uuid.uuid4().hex[:6]}@mailflow.test"
    html = ('<h1>Offer</h1><p onmouseover="alert(2)">Read me</p><script>alert(1);parent.document.title="pwned"</script>'
            '<img src="http://198.51.100.7/track.gif" alt="pixel"><a href="javascript:alert(3)">click</a>'
            '<iframe src="http://198.51.100.7/"></iframe>')
    code, doc, _ = s.submit({"from": sender, "to": me, "subject": "html mail", "html": html})
    assert code == 202
    token = s.token(me)
    from harness import wait_for

    wait_for(lambda: s.mailbox(me)["total"] >= 1, 60, what="html mail stored")
    sign_in(pg, s.api, token, me)
    pg.locator("#list tbody tr", has_text="html mail").get_by_role("link").click()
    frame_el = pg.locator("#msg-body iframe")
    sync_api.expect(frame_el).to_have_count(1)
    sandbox = frame_el.get_attribute("sandbox")
    assert sandbox is not None and "allow-scripts" not in sandbox and "allow-same-origin" not in sandbox
    frame = pg.frame_locator("#msg-body iframe")
    sync_api.expect(frame.get_by_role("heading", name="Offer")).to_be_visible()
    frame.get_by_text("Read me").hover()
    srcdoc = frame_el.get_attribute("srcdoc") or ""
    assert "<script" not in srcdoc and "onmouseover" not in srcdoc and "javascript:" not in srcdoc
    assert "<iframe" not in srcdoc and not re.search(r'\ssrc="http', srcdoc)
    sync_api.expect(pg.locator("#msg-remote")).to_contain_text("1 remote image")
    pg.wait_for_timeout(500)
    shot(pg, "5-html-inert")
    assert pg.title() == "mailflow webmail"
    assert pg.dialogs == [] and pg.offsite == []


def test_send_to_a_local_and_a_remote_address_shows_both_outcomes(browser, outgoing) -> None:  # noqa: ANN001
    s, peer = outgoing
    me, local, remote = (f"m{uuid.uuid4().hex[:6]}@mailflow.test", f"l{uuid.uuid4().hex[:6]}@local.test",
                         f"r{uuid.uuid4().hex[:6]}@far-away.test")
    subject = f"two ways {uuid.uuid4().hex[:8]}"
    with open_page(browser, s.api) as pg:
        sign_in(pg, s.api, s.token(me), me)
        pg.get_by_role("button", name="Compose").click()
        pg.locator("#c-to").fill(f"{local}, {remote}")
        pg.locator("#c-subject").fill(subject)
        pg.locator("#c-text").fill("One copy stays here, one goes out over SMTP.")
        pg.get_by_role("button", name="Send").click()
        # live from the status API: the local copy stored, the remote one delivered by the peer
        items = pg.locator("#send-recipients li")
        sync_api.expect(items.filter(has_text=remote)).to_contain_text(f"{remote}: delivered", timeout=90000)
        sync_api.expect(items.filter(has_text=local)).to_have_text(f"{local}: stored")
        sync_api.expect(pg.locator("#send-timeline")).to_contain_text("delivered")
        shot(pg, "6-remote-delivered")
        assert pg.offsite == [] and pg.dialogs == []
    got = [m for m in list(peer.messages) if f"Subject: {subject}".encode() in m[2]]
    assert len(got) == 1 and got[0][1] == [remote] and got[0][0] == me
