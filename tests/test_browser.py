"""The ``/demo`` page (``SECURE_WS_DEMO=1``) in a real headless Chromium, over real TLS.

Chromium is Debian's ``/usr/bin/chromium`` driven by Playwright's Python package (no
``playwright install``). The dev certificate is trusted by pinning: Chromium is launched
with ``--ignore-certificate-errors-spki-list=<sha256 of server.crt's SubjectPublicKeyInfo>``,
which accepts exactly that key and nothing else (``ignore_https_errors`` stays off); a
control test shows the same browser without the pin refuses the server.

No asyncio in this module: Playwright's sync API owns the thread's event loop.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from helpers import Server, base_env, unique_sub

CHROMIUM = Path("/usr/bin/chromium")
BASE_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 15_000


def spki_pin(certfile: Path) -> str:
    """base64(sha256(SubjectPublicKeyInfo)) of a PEM certificate: Chromium's SPKI pin format."""
    cert = x509.load_pem_x509_certificate(certfile.read_bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.skip(f"browser tests need Playwright's Python package ({exc}); install with: pip install -e '.[test]'")
    if not CHROMIUM.exists():
        pytest.skip(f"browser tests need Debian's Chromium at {CHROMIUM}; install with: apt-get install chromium")
    pw = sync_playwright().start()
    try:
        yield pw
    finally:
        pw.stop()


@pytest.fixture(scope="module")
def browser(playwright: Any, keydir: Path) -> Iterator[Any]:
    """Chromium that trusts exactly the test server's key, by SPKI pin."""
    pin = spki_pin(keydir / "server.crt")
    b = playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        headless=True,
        args=[*BASE_ARGS, f"--ignore-certificate-errors-spki-list={pin}"],
    )
    try:
        yield b
    finally:
        b.close()


class Watched:
    """A page plus everything it did on the network and the console."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(ignore_https_errors=False)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requests: list[str] = []
        self.websockets: list[str] = []
        self.console: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("websocket", lambda ws: self.websockets.append(ws.url))
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    def status(self, expected: str) -> None:
        from playwright.sync_api import expect

        expect(self.page.locator("#status")).to_have_text(expected, timeout=TIMEOUT_MS)

    def log_frames(self) -> list[Any]:
        frames = []
        for line in self.page.locator("#log > div").all_text_contents():
            try:
                frames.append(json.loads(line))
            except ValueError:
                frames.append(line)
        return frames

    def wait_for_frame(self, wanted: dict[str, Any]) -> None:
        self.page.wait_for_function(
            """(wanted) => Array.from(document.querySelectorAll('#log > div')).some((d) => {
                   let f; try { f = JSON.parse(d.textContent); } catch (e) { return false; }
                   return Object.entries(wanted).every(([k, v]) => JSON.stringify(f[k]) === JSON.stringify(v));
               })""",
            arg=wanted,
            timeout=TIMEOUT_MS,
        )

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watched(browser: Any) -> Iterator[Watched]:
    w = Watched(browser)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def demo_server(keydir: Path) -> Iterator[Any]:
    """``make_server(SECURE_WS_DEMO="1", …)`` whose allow-list holds its own origin.

    The page's WebSocket carries ``Origin: https://localhost:PORT``, refused (1008 ``origin not
    allowed``) unless listed, and the port is only known once the server object exists.
    """
    started: list[Server] = []

    def make(**env: str) -> Server:
        srv = Server(keydir, base_env(keydir, SECURE_WS_DEMO="1", **env))
        srv.env["SECURE_WS_ALLOWED_ORIGINS"] = srv.https
        started.append(srv)
        return srv.start()

    yield make
    for srv in started:
        srv.stop()


# -- without a browser ----------------------------------------------------------------------------


def test_demo_is_not_served_without_the_flag(server):
    status, _, _ = server.get("/demo")
    assert status == 404
    assert server.get("/healthz")[0] == 200  # the server itself answers


def test_demo_page_is_self_contained_with_strict_headers(make_server):
    srv = make_server(SECURE_WS_DEMO="1")
    status, headers, body = srv.get("/demo")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"
    assert headers["x-content-type-options"] == "nosniff"

    html = body.decode()
    # No external resource of any kind: no absolute http(s) URL, no protocol-relative URL, no src/href at all;
    # the one import is the client bundle from this server.
    assert not re.search(r"https?://", html, re.I), re.findall(r"https?://\S+", html, re.I)
    assert not re.search(r"""\b(src|href|action|srcset|poster)\s*=""", html, re.I)
    assert not re.search(r"""["'(]\s*//[^/]""", html), "protocol-relative URL"
    assert not re.search(r"<\s*(link|iframe|object|embed|img|base)\b", html, re.I)
    assert "innerHTML" not in html and "outerHTML" not in html and "insertAdjacentHTML" not in html
    assert re.findall(r"""\bfrom\s+["']([^"']+)["']""", html) == ["./demo/secure-ws-client.js"]
    # No protocol written by hand: the page never opens a socket or builds a frame itself.
    assert "new WebSocket" not in html and "JSON.parse" not in html and "bearer." not in html
    for element_id in ("status", "log", "channel", "subscribe", "message", "publish"):
        assert f'id="{element_id}"' in html, element_id

    directives = {d.split()[0]: d.split()[1:] for d in headers["content-security-policy"].split(";") if d.strip()}
    assert directives["default-src"] == ["'none'"]
    assert directives["connect-src"] in (["'self'"], ["'self'", "wss:"])
    assert directives["frame-ancestors"] == ["'none'"]
    for directive in ("script-src", "style-src"):
        assert "'unsafe-eval'" not in directives[directive] and "'unsafe-inline'" not in directives[directive]
        assert not any(s.startswith(("http", "*", "data:", "blob:")) for s in directives[directive])
    # The CSP pins exactly the inline blocks the page carries (a hash policy, stricter than 'unsafe-inline'),
    # and scripts from its own origin: the bundle.
    for tag, directive, extra in (("script", "script-src", ["'self'"]), ("style", "style-src", [])):
        blocks = re.findall(rf"<{tag}[^>]*>(.*?)</{tag}>", html, re.S)
        assert len(blocks) == 1, tag
        digest = base64.b64encode(hashlib.sha256(blocks[0].encode()).digest()).decode()
        assert directives[directive] == [f"'sha256-{digest}'", *extra], directive


def test_demo_serves_the_client_bundle_shipped_in_the_package(make_server):
    from secure_ws.demo import BUNDLE

    srv = make_server(SECURE_WS_DEMO="1")
    status, headers, body = srv.get("/demo/secure-ws-client.js")
    assert status == 200
    assert headers["content-type"].startswith("text/javascript")
    assert headers["x-content-type-options"] == "nosniff"
    assert body == BUNDLE and b"secure-ws.v1" in body and b"bearer." in body


# -- in Chromium ----------------------------------------------------------------------------------


def test_browser_subscribes_publishes_and_sees_token_expiry(demo_server, issue, watched):
    srv = demo_server(SECURE_WS_JWT_LEEWAY_SECONDS="0")
    sub = unique_sub("browser")
    token = issue(sub=sub, ttl=6, scope="subscribe:* publish:*")
    channel = f"room.{secrets.token_hex(4)}"
    text = f"<b>hello</b> {secrets.token_hex(4)}"  # markup that must show as text, never as HTML
    page = watched.page

    page.goto(f"{srv.https}/demo#token={token}")
    watched.status("connected")
    assert token not in page.url, "the page should drop the token from the address bar"

    page.fill("#channel", channel)
    page.click("#subscribe")
    watched.wait_for_frame({"type": "subscribed", "channel": channel})
    page.fill("#message", text)
    page.click("#publish")
    watched.wait_for_frame({"type": "message", "channel": channel, "from": sub, "data": text})
    watched.wait_for_frame({"type": "published", "channel": channel})
    assert page.locator("#log b").count() == 0, "a frame was rendered as HTML"
    assert page.locator("#log > div", has_text=text).count() == 1

    frames = watched.log_frames()
    assert isinstance(frames[0], dict) and frames[0]["type"] == "welcome" and frames[0]["sub"] == sub

    watched.status("closed 1008 token expired")

    # Only the page, the bundle and its own WebSocket (reconnected after the expiry, then refused), the token in no URL.
    assert set(watched.websockets) == {f"wss://localhost:{srv.port}/ws"}
    assert watched.requests and all(u.startswith(f"{srv.https}/demo") for u in watched.requests), watched.requests
    assert not any(token in u for u in watched.requests + watched.websockets)
    assert not [m for m in watched.console if "Content Security Policy" in m or m.startswith("pageerror")], watched.console

    log = srv.log()
    assert sub in log, "the server log should record this session (else the next check proves nothing)"
    assert token not in log
    assert token.rsplit(".", 1)[1] not in log  # not even the signature


def test_browser_shows_refusal_reasons(demo_server, watched):
    srv = demo_server()
    watched.page.goto(f"{srv.https}/demo")
    watched.status("no token: open this page as /demo#token=<jwt>")
    watched.page.goto("about:blank")
    watched.page.goto(f"{srv.https}/demo#token=not.a.jwt")
    watched.status("closed 1008 invalid token")


def test_browser_origin_must_be_allowed(make_server, issue, watched):
    """Default allow-list is empty: even the demo page's own origin is refused until listed."""
    srv = make_server(SECURE_WS_DEMO="1")
    watched.page.goto(f"{srv.https}/demo#token={issue(scope='subscribe:*')}")
    watched.status("closed 1008 origin not allowed")


def test_browser_without_the_pin_refuses_the_dev_certificate(playwright, make_server):
    """Control: trust comes from the SPKI pin, not from something that accepts any certificate."""
    from playwright.sync_api import Error

    srv = make_server(SECURE_WS_DEMO="1")
    b = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=BASE_ARGS)
    try:
        page = b.new_context(ignore_https_errors=False).new_page()
        with pytest.raises(Error, match=r"ERR_CERT_"):
            page.goto(f"{srv.https}/demo", timeout=TIMEOUT_MS)
    finally:
        b.close()
