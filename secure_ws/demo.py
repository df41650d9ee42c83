"""``GET /demo``: one self-contained browser page, served only with ``SECURE_WS_DEMO=1``.

The page reads the token from the URL fragment (``/demo#token=…``), which a browser
never sends to the server, then removes it from the address bar and history. It
connects to ``wss://<same host>/ws`` with the browser transport of SPEC §3, the
subprotocols ``["secure-ws.v1", "bearer.<jwt>"]``, so the token never appears in a
URL, a request line or a log.

Everything is inline; no external asset is loaded. The Content-Security-Policy
allows exactly this page's one script and one style block by their SHA-256 hashes
(computed below, so editing the markup keeps them right), and connections only to
the page's own origin (CSP3 ``'self'`` also matches ``wss:`` on the same host and
port). Received frames are written with ``textContent``, never as HTML.
"""

from __future__ import annotations

import base64
import hashlib

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

PATH = "/demo"

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; max-width: 60rem; color: #222; }
h1 { font-size: 1.2rem; margin: 0 0 .75rem; }
#status { font-family: ui-monospace, monospace; padding: .15rem .4rem; background: #eee; }
#status.ok { background: #d8f5d8; } #status.bad { background: #f8d8d8; }
form { display: flex; gap: .5rem; margin: .6rem 0; }
input { flex: 1; font: inherit; padding: .25rem; }
#log { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap; word-break: break-all;
       border: 1px solid #ccc; padding: .5rem; min-height: 8rem; max-height: 60vh; overflow: auto; }
#log div { border-bottom: 1px solid #f0f0f0; }
"""

_SCRIPT = """
"use strict";
(function () {
  var MAX_LINES = 500;
  var statusEl = document.getElementById("status");
  var logEl = document.getElementById("log");
  var buttons = [document.getElementById("subscribe"), document.getElementById("publish")];
  var nextId = 1;

  function setStatus(text, cls) {
    statusEl.textContent = text;
    statusEl.className = cls || "";
  }
  function logLine(text) {
    var line = document.createElement("div");
    line.textContent = text;  // text only, never parsed as markup: frames are untrusted data
    logEl.appendChild(line);
    while (logEl.childNodes.length > MAX_LINES) { logEl.removeChild(logEl.firstChild); }
    logEl.scrollTop = logEl.scrollHeight;
  }
  function enable(on) { buttons.forEach(function (b) { b.disabled = !on; }); }

  // The token lives in the fragment, which is never sent to the server; drop it from the
  // address bar and history as soon as it has been read.
  var token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
  if (location.hash) { history.replaceState(null, "", location.pathname + location.search); }

  var protocols = ["secure-ws.v1"];
  if (token) { protocols.push("bearer." + token); }
  token = null;

  setStatus("connecting");
  var ws = new WebSocket("wss://" + location.host + "/ws", protocols);
  protocols = null;

  ws.onmessage = function (event) {
    var text = typeof event.data === "string" ? event.data : "[binary frame]";
    logLine(text);
    var frame = null;
    try { frame = JSON.parse(text); } catch (e) { return; }
    if (frame && frame.type === "welcome") {
      setStatus("connected", "ok");
      enable(true);
    }
  };
  ws.onclose = function (event) {
    enable(false);
    setStatus(("closed " + event.code + " " + event.reason).trim(), "bad");
  };

  function send(message) {
    if (ws.readyState !== WebSocket.OPEN) { return; }
    message.id = nextId++;
    ws.send(JSON.stringify(message));
  }
  function channel() { return document.getElementById("channel").value.trim(); }

  document.getElementById("subscribe-form").addEventListener("submit", function (event) {
    event.preventDefault();
    send({ type: "subscribe", channel: channel() });
  });
  document.getElementById("publish-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var input = document.getElementById("message");
    send({ type: "publish", channel: channel(), data: input.value });
    input.value = "";
  });
})();
"""

_HTML = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>secure-ws demo</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>secure-ws demo</h1>
<p>Status: <span id="status">loading</span></p>
<form id="subscribe-form" autocomplete="off">
  <input id="channel" value="demo" aria-label="channel" maxlength="128">
  <button id="subscribe" type="submit" disabled>Subscribe</button>
</form>
<form id="publish-form" autocomplete="off">
  <input id="message" placeholder="message" aria-label="message">
  <button id="publish" type="submit" disabled>Publish</button>
</form>
<div id="log" role="log" aria-live="polite"></div>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        f"script-src {_hash(_SCRIPT)}",
        f"style-src {_hash(_STYLE)}",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def page() -> str:
    """The demo page's HTML (for tests and for anyone who wants to save it)."""
    return _HTML


async def demo(request: Request) -> Response:
    return Response(_HTML, media_type="text/html; charset=utf-8", headers=HEADERS)


def routes() -> list[Route]:
    return [Route(PATH, demo, methods=["GET"])]
