// What the node --test suites share: the real server (this repository's Python package, over TLS with its dev CA),
// tokens signed with the deployment's EdDSA key, the server API, a throw-away redis-server, and a WebSocket class
// (the `ws` package) that trusts the dev CA and records what the client sent.
import { spawn, execFileSync } from "node:child_process";
import { createPrivateKey, sign, randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, openSync } from "node:fs";
import { request } from "node:https";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { WebSocket } from "ws";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const venv = join(ROOT, ".venv/bin/python");
export const PYTHON = process.env.SECURE_WS_PYTHON || (existsSync(venv) ? venv : "python3");

// Unhandled rejections fail the suite: the client must never leave one behind.
export const unhandled = [];
process.on("unhandledRejection", (reason) => unhandled.push(reason));

export async function waitFor(condition, within, what, every = 20) {
  const deadline = Date.now() + within;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${within} ms`);
    await new Promise((r) => setTimeout(r, every));
  }
}

export function freePort() {
  return new Promise((resolvePort, reject) => {
    const srv = createServer();
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolvePort(port));
    });
    srv.on("error", reject);
  });
}

function python(args, env, cwd) {
  return execFileSync(PYTHON, args, { env, cwd, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

/** A key folder (dev CA, server certificate, one EdDSA signing key) made the way the Python tests make it. */
export function makeKeydir() {
  const dir = mkdtempSync(join(tmpdir(), "secure-ws-js-"));
  python(["-c", "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); from keydir import make_keydir; make_keydir(Path(sys.argv[2]))", join(ROOT, "scripts"), dir], process.env);
  return new Keys(dir);
}

export class Keys {
  constructor(dir) {
    this.dir = dir;
    this.ca = readFileSync(join(dir, "ca.crt"));
    const doc = JSON.parse(readFileSync(join(dir, "signing-keys.json"), "utf8"));
    const key = doc.keys.find((k) => k.status === "active");
    this.kid = key.kid;
    this.key = createPrivateKey({ key: { kty: key.kty, crv: key.crv, d: key.d, x: key.x }, format: "jwk" });
    this.apiKeysFile = join(dir, "api-keys.json");
  }

  env(extra = {}) {
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("SECURE_WS_")));
    return {
      ...env,
      SECURE_WS_JWKS_FILE: join(this.dir, "jwks.json"),
      SECURE_WS_SIGNING_KEYS_FILE: join(this.dir, "signing-keys.json"),
      SECURE_WS_REVOCATION_FILE: join(this.dir, "revocations.json"),
      SECURE_WS_TLS_CERTFILE: join(this.dir, "server.crt"),
      SECURE_WS_TLS_KEYFILE: join(this.dir, "server.key"),
      SECURE_WS_API_KEYS_FILE: this.apiKeysFile,
      SECURE_WS_HANDSHAKE_RATE_LIMIT: "100000/minute",
      PYTHONUNBUFFERED: "1",
      PYTHONPATH: join(ROOT, "tests/apps"),
      ...extra,
    };
  }

  /** A JWT as the deployment's `secure-ws token issue` makes it (EdDSA, kid, jti). */
  issue({ sub = uniqueSub(), ttl = 900, scope = "subscribe:* publish:*", ...claims } = {}) {
    const now = Math.floor(Date.now() / 1000);
    const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
    const payload = { iss: "secure-ws", aud: "secure-ws", sub, iat: now, exp: now + ttl, jti: randomBytes(9).toString("base64url"), scope, ...claims };
    const input = `${b64({ alg: "EdDSA", typ: "JWT", kid: this.kid })}.${b64(payload)}`;
    return `${input}.${sign(null, Buffer.from(input), this.key).toString("base64url")}`;
  }

  /** `secure-ws apikey create`: a server-API key (create it before the server starts, or wait 2 s). */
  apiKey() {
    return python(["-m", "secure_ws", "apikey", "create", `js-${randomBytes(3).toString("hex")}`], this.env(), this.dir).trim();
  }

  /** A `ws` WebSocket class that trusts the dev CA and records every socket it made and what was sent on it. */
  WebSocket() {
    const ca = this.ca;
    const sockets = [];
    class Recording extends WebSocket {
      constructor(url, protocols, options) {
        super(url, protocols, { ca, ...options });
        this.sent = [];
        sockets.push(this);
      }
      send(data) {
        this.sent.push(JSON.parse(data));
        super.send(data);
      }
    }
    Recording.sockets = sockets;
    return Recording;
  }
}

let subs = 0;
export function uniqueSub(prefix = "js") {
  return `${prefix}-${++subs}-${randomBytes(3).toString("hex")}`;
}

export function uniqueChannel() {
  return `room.${randomBytes(4).toString("hex")}`;
}

/** `uvicorn js_app:app` over TLS (tests/apps/js_app.py): every built-in type plus the test application's. */
export class Server {
  constructor(keys, { env = {}, workers = 1 } = {}) {
    this.keys = keys;
    this.extraEnv = env;
    this.workers = workers;
  }

  get url() {
    return `wss://localhost:${this.port}/ws`;
  }

  async start() {
    this.port = await freePort();
    this.logPath = join(this.keys.dir, `server-${this.port}.log`);
    const log = openSync(this.logPath, "a");
    const args = ["-m", "uvicorn", "js_app:app", "--host", "127.0.0.1", "--port", String(this.port), "--ssl-keyfile", join(this.keys.dir, "server.key"), "--ssl-certfile", join(this.keys.dir, "server.crt")];
    if (this.workers > 1) args.push("--workers", String(this.workers));
    this.proc = spawn(PYTHON, args, { env: this.keys.env(this.extraEnv), cwd: this.keys.dir, stdio: ["ignore", log, log] });
    await waitFor(async () => {
      if (this.proc.exitCode !== null) throw new Error(`server exited ${this.proc.exitCode}:\n${this.log()}`);
      try {
        return (await this.get("/readyz")) === 200;
      } catch {
        return false;
      }
    }, 30000, "server ready", 100);
    return this;
  }

  log() {
    return readFileSync(this.logPath, "utf8");
  }

  get(path) {
    return new Promise((ok, ko) => {
      const req = request({ host: "127.0.0.1", servername: "localhost", port: this.port, path, ca: this.keys.ca }, (res) => {
        res.resume();
        ok(res.statusCode);
      });
      req.on("error", ko);
      req.end();
    });
  }

  /** `POST /api/<method>` with an API key: the parsed answer. */
  api(key, method, body = {}) {
    return new Promise((ok, ko) => {
      const payload = JSON.stringify(body);
      const req = request(
        { host: "127.0.0.1", servername: "localhost", port: this.port, path: `/api/${method}`, method: "POST", ca: this.keys.ca, headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" } },
        (res) => {
          let text = "";
          res.setEncoding("utf8");
          res.on("data", (c) => (text += c));
          res.on("end", () => (res.statusCode === 200 ? ok(JSON.parse(text)) : ko(new Error(`${method}: HTTP ${res.statusCode} ${text}`))));
        },
      );
      req.on("error", ko);
      req.end(payload);
    });
  }

  /** The worker processes (with --workers) and the TCP connections each holds on the server port. */
  workerHolding(clientPort) {
    const pids = execFileSync("pgrep", ["-P", String(this.proc.pid)], { encoding: "utf8" }).split(/\s+/).filter(Boolean);
    const inodes = new Set();
    for (const line of readFileSync("/proc/net/tcp", "utf8").split("\n").slice(1)) {
      const cols = line.trim().split(/\s+/);
      if (cols.length < 10) continue;
      const local = parseInt(cols[1].split(":")[1], 16);
      const remote = parseInt(cols[2].split(":")[1], 16);
      if (local === this.port && remote === clientPort) inodes.add(cols[9]);
    }
    for (const pid of pids) {
      let fds = [];
      try {
        fds = readdirSync(`/proc/${pid}/fd`);
      } catch {
        continue;
      }
      for (const fd of fds) {
        try {
          const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
          if (m && inodes.has(m[1])) return Number(pid);
        } catch {
          // the fd closed meanwhile
        }
      }
    }
    return undefined;
  }

  async stop() {
    if (!this.proc || this.proc.exitCode !== null) return;
    const exited = new Promise((r) => this.proc.once("exit", r));
    this.proc.kill("SIGTERM");
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), 15000);
    await exited;
    clearTimeout(timer);
  }
}

/** A throw-away redis-server on a spare port, no persistence. */
export async function startRedis() {
  const port = await freePort();
  const proc = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdio: "ignore" });
  await waitFor(
    () =>
      new Promise((ok) => {
        const s = createServer();
        s.once("error", () => ok(true)); // the port is taken: redis listens
        s.listen(port, "127.0.0.1", () => s.close(() => ok(false)));
      }),
    10000,
    "redis-server listening",
    50,
  );
  return {
    url: `redis://127.0.0.1:${port}/0`,
    stop: () => {
      if (proc.exitCode === null) proc.kill("SIGKILL");
    },
  };
}

/** A client's state events, in order. */
export function states(client) {
  const seen = [];
  client.on("state", (s) => seen.push(s));
  return seen;
}
