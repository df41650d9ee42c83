// Garbage from a server: a small fake server (the `ws` package, plain ws:// on loopback) that misbehaves on purpose.
// Each case ends in a clear error or is ignored as documented; never a hang, never an unhandled rejection.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { WebSocket, WebSocketServer } from "ws";
import { Client, CloseError, AuthError, RequestError } from "../dist/index.js";
import { waitFor, states, unhandled } from "./harness.mjs";

const servers = [];

/** A fake server: `onConnection(socket)` plays the script; answers `echo` requests like the real one unless told otherwise. */
async function fake(onConnection) {
  const http = createServer();
  const wss = new WebSocketServer({ server: http, handleProtocols: (protocols) => (protocols.has("secure-ws.v1") ? "secure-ws.v1" : false) });
  wss.on("connection", onConnection);
  await new Promise((r) => http.listen(0, "127.0.0.1", r));
  servers.push({ http, wss });
  return { url: `ws://127.0.0.1:${http.address().port}/ws`, http, wss };
}

const welcome = JSON.stringify({ type: "welcome", sub: "s", connection_id: "c", expires_at: Math.floor(Date.now() / 1000) + 3600, rate_limit: "20/second" });

function echoing(socket) {
  socket.on("message", (raw) => {
    const f = JSON.parse(raw);
    if (f.type === "echo") socket.send(JSON.stringify({ type: "echo", id: f.id, data: f.data }));
  });
}

function client(url, options = {}) {
  return new Client(url, { getToken: () => "t.t.t", WebSocket, allowInsecure: true, backoffInitial: 20, backoffMax: 100, openTimeout: 2000, ...options });
}

after(() => {
  for (const { http, wss } of servers) {
    wss.clients.forEach((s) => s.terminate());
    wss.close();
    http.close();
  }
  assert.deepEqual(unhandled, [], "no unhandled rejection");
});

test("frames that are not JSON, not objects, binary, of unknown types or for nobody are ignored", async () => {
  const { url } = await fake((socket) => {
    socket.send(welcome);
    for (const junk of ["not json", "[1,2]", "null", "42", '"s"', '{"type":"mystery","x":1}', '{"type":"result","id":999,"data":1}', '{"type":"error","code":"weird"}', '{"type":"chunk","id":12345}', '{"no":"type"}'])
      socket.send(junk);
    socket.send(Buffer.from([0, 1, 2]), { binary: true });
    echoing(socket);
  });
  const c = client(url);
  const errors = [];
  c.on("error", (e) => errors.push(e));
  await c.connect();
  assert.equal(await c.echo("fine"), "fine");
  assert.equal(c.state, "connected");
  assert.deepEqual(errors, []);
  c.close();
});

test("a first frame that is not a welcome is a clear protocol error, not a retry loop", async () => {
  for (const first of ["garbage", '{"type":"pong"}', "[]"]) {
    let connections = 0;
    const { url } = await fake((socket) => {
      connections++;
      socket.send(first);
    });
    const c = client(url);
    await assert.rejects(c.connect(), (e) => e instanceof CloseError && e.code === 1002 && /not a welcome/.test(e.message));
    assert.equal(connections, 1);
    assert.equal(c.state, "closed");
  }
});

test("a close code the client does not know stops it with a CloseError carrying code and reason", async () => {
  const { url } = await fake((socket) => {
    socket.send(welcome);
    setTimeout(() => socket.close(4321, "mystery"), 20);
  });
  const c = client(url);
  const errors = [];
  c.on("error", (e) => errors.push(e));
  await c.connect();
  await waitFor(() => c.state === "closed", 3000, "stopped");
  assert.equal(errors.length, 1);
  assert.ok(errors[0] instanceof CloseError && !(errors[0] instanceof AuthError));
  assert.equal(errors[0].code, 4321);
  assert.equal(errors[0].reason, "mystery");
});

test("an unknown 1008 reason is fatal (AuthError); a retryable one is retried", async () => {
  let n = 0;
  const { url } = await fake((socket) => {
    n++;
    if (n === 1) socket.close(1008, "slow consumer");
    else socket.close(1008, "made up reason");
  });
  const c = client(url);
  const seen = states(c);
  await assert.rejects(c.connect(), (e) => e instanceof AuthError && e.reason === "made up reason");
  assert.equal(n, 2);
  assert.deepEqual(seen, ["connecting", "disconnected", "connecting", "closed"]);
});

test("a connection dropped mid-handshake is retried with backoff; close() ends the wait", async () => {
  let attempts = 0;
  const http = createServer();
  http.on("upgrade", (req, socket) => {
    attempts++;
    socket.destroy();
  });
  await new Promise((r) => http.listen(0, "127.0.0.1", r));
  servers.push({ http, wss: { clients: new Set(), close() {} } });
  const c = client(`ws://127.0.0.1:${http.address().port}/ws`);
  const seen = states(c);
  const connecting = c.connect();
  await waitFor(() => attempts >= 3, 5000, "retries");
  c.close();
  await assert.rejects(connecting, (e) => e instanceof RequestError && e.code === "closed");
  assert.deepEqual(seen.slice(0, 3), ["connecting", "disconnected", "connecting"]);
  assert.equal(seen.at(-1), "closed");
});

test("a server that never sends the welcome hits the open timeout and is retried", async () => {
  let attempts = 0;
  const { url } = await fake(() => attempts++);
  const c = client(url, { openTimeout: 100 });
  const connecting = c.connect();
  await waitFor(() => attempts >= 2, 5000, "second attempt");
  c.close();
  await assert.rejects(connecting, RequestError);
});

test("a request in flight when the server drops the connection fails with code disconnected", async () => {
  const { url } = await fake((socket) => {
    socket.send(welcome);
    socket.on("message", () => socket.terminate());
  });
  const c = client(url);
  await c.connect();
  await assert.rejects(c.echo(1), (e) => e instanceof RequestError && e.code === "disconnected");
  c.close();
});

test("a token provider that throws is retried, its error reported; one that returns garbage too", async () => {
  let calls = 0;
  const { url } = await fake((socket) => socket.send(welcome));
  const c = client(url, {
    getToken: async () => {
      calls++;
      if (calls === 1) throw new Error("identity provider down");
      if (calls === 2) return "";
      return "t.t.t";
    },
  });
  const errors = [];
  c.on("error", (e) => errors.push(String(e)));
  await c.connect();
  assert.equal(calls, 3);
  assert.deepEqual(errors, ["Error: identity provider down", "Error: getToken must return a non-empty JWT string"]);
  c.close();
  // A provider that throws AuthError stops the client.
  const d = client(url, { getToken: () => Promise.reject(new AuthError(1008, "logged out")) });
  await assert.rejects(d.connect(), (e) => e instanceof AuthError && e.reason === "logged out");
});

test("a ws:// URL is refused unless allowed, and a missing WebSocket is a clear error", () => {
  assert.throws(() => new Client("ws://x/ws", { getToken: () => "t", WebSocket }), /wss:/);
  if (!globalThis.WebSocket) assert.throws(() => new Client("wss://x/ws", { getToken: () => "t" }), /WebSocket/);
});

test("live offsets: a duplicate is dropped, a gap is repaired with since, a new epoch is a recovery failure", async () => {
  const msg = (offset, epoch = "e1") => JSON.stringify({ type: "message", channel: "c", data: offset, offset, epoch });
  const subscribes = [];
  const { url } = await fake((socket) => {
    socket.send(welcome);
    socket.on("message", (raw) => {
      const f = JSON.parse(raw);
      if (f.type !== "subscribe") return;
      subscribes.push(f);
      if (!f.since) {
        socket.send(JSON.stringify({ type: "subscribed", id: f.id, channel: "c", offset: 0, epoch: "e1" }));
        for (const frame of [msg(1), msg(1), msg(3), msg(4)]) socket.send(frame); // a duplicate, then a gap
      } else {
        socket.send(JSON.stringify({ type: "subscribed", id: f.id, channel: "c", offset: 4, epoch: "e1", recovered: true }));
        for (const frame of [msg(2), msg(3), msg(4), msg(5), msg(1, "e2"), msg(2, "e2")]) socket.send(frame); // the replay, then history lost
      }
    });
  });
  const c = client(url);
  const got = [];
  const failed = [];
  await c.connect();
  await c.subscribe("c", { onMessage: (m) => got.push(`${m.epoch}:${m.offset}`), onRecoveryFailed: (ch) => failed.push(ch) }).ready;
  await waitFor(() => got.length === 7, 3000, `messages (got ${got})`);
  assert.deepEqual(got, ["e1:1", "e1:2", "e1:3", "e1:4", "e1:5", "e2:1", "e2:2"]);
  assert.deepEqual(subscribes.map((f) => f.since), [undefined, { offset: 1, epoch: "e1" }]);
  assert.deepEqual(failed, ["c"]);
  c.close();
});
