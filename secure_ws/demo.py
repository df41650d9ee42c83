"""``GET /demo``: a browser page on the TypeScript client, served only with ``SECURE_WS_DEMO=1``.

The page reads the token from the URL fragment (``/demo#token=…``), which a browser
never sends to the server, then removes it from the address bar and history. It
connects with the client bundle (``secure-ws-client``, built from ``clients/js`` and
shipped in this package as ``static/secure-ws-client.js``), served by this server at
``/demo/secure-ws-client.js``: no CDN, no protocol code of its own. The client uses the
browser transport, the subprotocols ``["secure-ws.v1", "bearer.<jwt>"]``, so the token
never appears in a URL, a request line or a log.

The Content-Security-Policy allows this page's one inline module and style block by
their SHA-256 hashes (computed below, so editing the markup keeps them right) plus
scripts from the page's own origin (the bundle), and connections only to that origin
(CSP3 ``'self'`` also matches ``wss:`` on the same host and port). Received frames are
written with ``textContent``, never as HTML.
"""

from __future__ import annotations

import base64
import hashlib
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

PATH = "/demo"
BUNDLE_PATH = "/demo/secure-ws-client.js"

# The TypeScript client (clients/js) as esbuild bundles it, shipped in this package; about 10 KB, read once.
BUNDLE = (resources.files("secure_ws") / "static" / "secure-ws-client.js").read_bytes()
_BUNDLE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Cross-Origin-Resource-Policy": "same-origin"}

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
import { Client } from "./demo/secure-ws-client.js";

const MAX_LINES = 500;
const $ = (id) => document.getElementById(id);
const statusEl = $("status");
const logEl = $("log");
const buttons = [$("subscribe"), $("publish")];

function setStatus(text, cls) {
  statusEl.textContent = text;
  statusEl.className = cls || "";
}
function logLine(value) {
  const line = document.createElement("div");
  line.textContent = typeof value === "string" ? value : JSON.stringify(value);  // text only: frames are untrusted data
  logEl.appendChild(line);
  while (logEl.childNodes.length > MAX_LINES) { logEl.removeChild(logEl.firstChild); }
  logEl.scrollTop = logEl.scrollHeight;
}
function enable(on) { buttons.forEach((b) => { b.disabled = !on; }); }
function failure(error) { return { type: "error", code: error.code, message: error.message }; }

// The token lives in the fragment, which is never sent to the server; drop it from the
// address bar and history as soon as it has been read.
const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
if (location.hash) { history.replaceState(null, "", location.pathname + location.search); }

if (!token) {
  setStatus("no token: open this page as /demo#token=<jwt>", "bad");
} else {
  // The page's one token cannot be refreshed: the server closes at its expiry, and the client stops
  // once a reconnect is refused "token expired" again.
  const client = new Client("wss://" + location.host + location.pathname.replace(/demo$/, "ws"), {
    getToken: () => token,
    refreshBefore: 0,
  });
  client.on("state", (state) => {
    if (state === "connected") {
      setStatus("connected", "ok");
      enable(true);
      logLine(client.welcome);
    } else if (state !== "closed") {
      enable(false);
      setStatus(state);
    }
  });
  client.on("error", (error) => {
    if (typeof error.reason === "string") {  // the client stopped for good on this close
      enable(false);
      setStatus(("closed " + error.code + " " + error.reason).trim(), "bad");
    } else {
      logLine("error: " + error.message);
    }
  });
  client.on("push", (data) => logLine({ type: "push", data }));
  client.connect().catch(() => {});  // reported by the "error" listener

  const subscriptions = new Map();  // one per channel subscribed from this page
  const channel = () => $("channel").value.trim();
  $("subscribe-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = channel();
    if (subscriptions.has(name)) { return; }
    const sub = client.subscribe(name, {
      onMessage: (message) => logLine({ type: "message", ...message }),
      onRecoveryFailed: (lost) => logLine("messages on " + lost + " may have been missed"),
    });
    subscriptions.set(name, sub);
    sub.ready.then(() => logLine({ type: "subscribed", channel: name }), (error) => {
      subscriptions.delete(name);
      logLine(failure(error));
    });
  });
  $("publish-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("message");
    const name = channel();
    client.publish(name, input.value).then(() => logLine({ type: "published", channel: name }), (error) => logLine(failure(error)));
    input.value = "";
  });
}
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
<script type="module">{_SCRIPT}</script>
</body>
</html>
"""


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        f"script-src {_hash(_SCRIPT)} 'self'",  # the page's module, and the client bundle it imports from here
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


async def bundle(request: Request) -> Response:
    return Response(BUNDLE, media_type="text/javascript; charset=utf-8", headers=_BUNDLE_HEADERS)


def routes() -> list[Route]:
    return [Route(PATH, demo, methods=["GET"]), Route(BUNDLE_PATH, bundle, methods=["GET"])]
