// The client against the real server (uvicorn over TLS with the dev CA, tests/apps/js_app.py), one ability a test.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Client, AuthError, RequestError, RateLimitedError } from "../dist/index.js";
import { makeKeydir, Server, uniqueSub, uniqueChannel, waitFor, states, unhandled } from "./harness.mjs";

let keys, server, apiKey;
const clients = [];

function client(options = {}) {
  const WS = options.WebSocket ?? keys.WebSocket();
  const c = new Client(options.url ?? server.url, { getToken: () => keys.issue(), WebSocket: WS, backoffInitial: 50, backoffMax: 500, ...options });
  c.WS = WS;
  clients.push(c);
  return c;
}

before(async () => {
  keys = makeKeydir();
  apiKey = keys.apiKey();
  server = await new Server(keys, { env: { SECURE_WS_HISTORY_SIZE: "1000" } }).start();
});

after(async () => {
  clients.forEach((c) => c.close());
  await server?.stop();
  assert.deepEqual(unhandled, [], "no unhandled rejection");
});

test("connects with the subprotocol transport and answers the built-in types", async () => {
  const sub = uniqueSub();
  const c = client({ getToken: () => keys.issue({ sub }) });
  const seen = states(c);
  await c.connect();
  assert.equal(c.welcome.sub, sub);
  assert.deepEqual(seen, ["connecting", "connected"]);
  assert.deepEqual(c.WS.sockets[0].protocol, "secure-ws.v1");
  assert.deepEqual(await c.echo({ hello: ["world", 1] }), { hello: ["world", 1] });
  assert.ok((await c.ping()) >= 0);
  await c.connect(); // already connected: resolves at once
});

test("the header transport (Node) authenticates too", async () => {
  const sub = uniqueSub();
  const c = client({ transport: "header", getToken: () => keys.issue({ sub }) });
  await c.connect();
  assert.equal(c.welcome.sub, sub);
  assert.deepEqual(await c.call("add", { a: 2, b: 3 }), { sum: 5 });
});

test("call: results, the application's errors, a client-side timeout", async () => {
  const c = client();
  await c.connect();
  const results = await Promise.all([c.call("add", { a: 1, b: 1 }), c.call("slow", 0.2), c.call("add", { a: 2, b: 2 })]);
  assert.deepEqual(results, [{ sum: 2 }, "late", { sum: 4 }]);
  await assert.rejects(c.call("refuse", {}), (e) => e instanceof RequestError && e.code === "nope" && e.message === "refused on purpose");
  await assert.rejects(c.call("no.such.type", {}), (e) => e instanceof RequestError && e.code === "unknown_type");
  await assert.rejects(c.call("slow", 2, { timeout: 100 }), (e) => e instanceof RequestError && e.code === "timeout");
  const aborted = new AbortController();
  const pending = c.call("slow", 2, { signal: aborted.signal });
  aborted.abort(new Error("changed my mind"));
  await assert.rejects(pending, /changed my mind/);
  assert.deepEqual(await c.call("add", { a: 3, b: 4 }), { sum: 7 }, "the connection stays usable");
});

test("rate_limited surfaces as RateLimitedError with retryAfterMs", async () => {
  const own = await new Server(keys, { env: { SECURE_WS_RATE_LIMIT: "5/second", SECURE_WS_RATE_LIMIT_CLOSE_AFTER: "100" } }).start();
  try {
    const c = client({ url: own.url });
    await c.connect();
    const outcomes = await Promise.allSettled(Array.from({ length: 12 }, (_, i) => c.echo(i)));
    const limited = outcomes.filter((o) => o.status === "rejected");
    assert.ok(limited.length >= 5, `expected refusals, got ${limited.length}`);
    for (const { reason } of limited) {
      assert.ok(reason instanceof RateLimitedError && reason instanceof RequestError, String(reason));
      assert.equal(reason.code, "rate_limited");
      assert.ok(reason.retryAfterMs > 0);
    }
    const answered = outcomes.filter((o) => o.status === "fulfilled").map((o) => o.value);
    assert.equal(new Set(answered).size, answered.length, "each reply went to its own request");
    c.close();
  } finally {
    await own.stop();
  }
});

test("pushes from the application and from the server API", async () => {
  const sub = uniqueSub();
  const c = client({ getToken: () => keys.issue({ sub }) });
  const pushes = [];
  c.on("push", (d) => pushes.push(d));
  await c.connect();
  await c.call("push.me", { n: 1 });
  await server.api(apiKey, "send", { sub, data: { n: 2 } });
  await waitFor(() => pushes.length === 2, 5000, "two pushes");
  assert.deepEqual(pushes, [{ n: 1 }, { n: 2 }]);
});

test("subscribe, publish, history, presence, join and leave", async () => {
  const channel = uniqueChannel();
  const [a, b] = [client(), client()];
  await Promise.all([a.connect(), b.connect()]);
  const got = [];
  const joins = [];
  const leaves = [];
  const sa = a.subscribe(channel, { onMessage: (m) => got.push(m), joinLeave: true, onJoin: (e) => joins.push(e), onLeave: (e) => leaves.push(e) });
  await sa.ready;
  const sb = b.subscribe(channel);
  await sb.ready;
  await waitFor(() => joins.length === 1, 5000, "join");
  assert.equal(joins[0].sub, b.welcome.sub);
  assert.equal(joins[0].connection_id, b.welcome.connection_id);
  await b.publish(channel, { text: "one" });
  await b.publish(channel, "two");
  await waitFor(() => got.length === 2, 5000, "two messages");
  assert.deepEqual(got.map((m) => [m.channel, m.from, m.data, m.offset]), [
    [channel, b.welcome.sub, { text: "one" }, 1],
    [channel, b.welcome.sub, "two", 2],
  ]);
  assert.equal(typeof got[0].epoch, "string");
  const history = await a.history(channel, { limit: 10 });
  assert.deepEqual(history.messages.map((m) => m.data), [{ text: "one" }, "two"]);
  assert.deepEqual(Object.keys(history).sort(), ["epoch", "messages", "offset"]);
  assert.equal(history.offset, 2);
  assert.equal(history.epoch, got[0].epoch);
  const presence = await a.presence(channel);
  assert.equal(presence.count, 2);
  assert.deepEqual(Object.keys(presence.clients).sort(), [a.welcome.connection_id, b.welcome.connection_id].sort());
  sb.unsubscribe();
  await waitFor(() => leaves.length === 1, 5000, "leave");
  sa.unsubscribe();
  await b.publish(channel, "after");
  assert.equal((await a.history(channel, { limit: 1 })).messages[0].data, "after");
  assert.equal(got.length, 2, "nothing after unsubscribe");
  await assert.rejects(a.subscribe("not a channel!").ready, (e) => e instanceof RequestError && e.code === "bad_request");
});

test("a refused subscription rejects ready; forbidden publish is a RequestError", async () => {
  const c = client({ getToken: () => keys.issue({ scope: "subscribe:room.*" }) });
  await c.connect();
  await assert.rejects(c.subscribe("secret.x").ready, (e) => e instanceof RequestError && e.code === "forbidden");
  await assert.rejects(c.publish("room.x", 1), (e) => e instanceof RequestError && e.code === "forbidden");
});

/** Publish `count` messages from the server API while `cut` runs; the subscriber must see offsets 1…count once each. */
async function publishThrough(srv, channel, count, cut) {
  let published = 0;
  const publishing = (async () => {
    for (; published < count; published++) await srv.api(apiKey, "publish", { channel, data: published + 1 });
  })();
  await cut(() => published);
  await publishing;
}

test("reconnects after the server API disconnects it and recovers every message once, in order", async () => {
  const sub = uniqueSub();
  const channel = uniqueChannel();
  const c = client({ getToken: () => keys.issue({ sub }) });
  const seen = states(c);
  const got = [];
  const failed = [];
  await c.connect();
  await c.subscribe(channel, { onMessage: (m) => got.push(m), onRecoveryFailed: (ch) => failed.push(ch) }).ready;
  const count = 120;
  await publishThrough(server, channel, count, async (published) => {
    for (let cut = 0; cut < 3; cut++) {
      await waitFor(() => published() >= (cut + 1) * 30, 20000, "publishing");
      const before = c.WS.sockets.length;
      await server.api(apiKey, "disconnect", { sub });
      await waitFor(() => c.WS.sockets.length > before && c.state === "connected", 10000, "reconnected");
    }
  });
  await waitFor(() => got.length >= count, 10000, `all ${count} messages (got ${got.length})`);
  assert.deepEqual(got.map((m) => m.offset), Array.from({ length: count }, (_, i) => i + 1), "no gap, no duplicate, in order");
  assert.deepEqual(got.map((m) => m.data), Array.from({ length: count }, (_, i) => i + 1));
  assert.deepEqual(failed, []);
  assert.ok(seen.filter((s) => s === "disconnected").length >= 3, seen.join(","));
  for (const ws of c.WS.sockets.slice(1)) {
    const subscribes = ws.sent.filter((f) => f.type === "subscribe");
    assert.equal(subscribes.length, 1, "one subscribe per reconnect: no handler piles up");
    assert.equal(typeof subscribes[0].since?.offset, "number", "every reconnect subscribed with since");
  }
});

test("recovery works when nothing was received before the cut", async () => {
  const sub = uniqueSub();
  const channel = uniqueChannel();
  const c = client({ getToken: () => keys.issue({ sub }), backoffInitial: 300 });
  const got = [];
  await c.connect();
  await c.subscribe(channel, { onMessage: (m) => got.push(m.data) }).ready;
  await server.api(apiKey, "disconnect", { sub });
  await waitFor(() => c.state !== "connected", 5000, "cut");
  await server.api(apiKey, "publish", { channel, data: "while away" });
  await waitFor(() => got.length === 1, 10000, "the message published while away");
  await server.api(apiKey, "publish", { channel, data: "live" });
  await waitFor(() => got.length === 2, 5000, "live");
  assert.deepEqual(got, ["while away", "live"]);
  assert.equal(c.WS.sockets[1].sent.find((f) => f.type === "subscribe").since.offset, 0);
});

test("recovered:false calls onRecoveryFailed and carries on live", async () => {
  const channel = uniqueChannel();
  const c = client();
  await c.connect();
  const failed = [];
  const got = [];
  await c.subscribe(channel, { since: { offset: 3, epoch: "not-the-epoch" }, onRecoveryFailed: (ch) => failed.push(ch), onMessage: (m) => got.push(m.data) }).ready;
  assert.deepEqual(failed, [channel]);
  await c.publish(channel, "live");
  await waitFor(() => got.length === 1, 5000, "live message");
  assert.deepEqual(got, ["live"]);
});

test("a token that expires while connected is refreshed in band, on the same connection", async () => {
  const own = await new Server(keys, { env: { SECURE_WS_JWT_LEEWAY_SECONDS: "0" } }).start();
  try {
    const sub = uniqueSub();
    let tokens = 0;
    const c = client({ url: own.url, getToken: () => (tokens++, keys.issue({ sub, ttl: 3 })) });
    await c.connect();
    const first = c.welcome.expires_at;
    await waitFor(() => c.WS.sockets[0].sent.filter((f) => f.type === "refresh").length >= 2, 8000, "two refreshes");
    await new Promise((r) => setTimeout(r, Math.max(0, first * 1000 - Date.now()) + 500)); // past the first token's exp
    assert.deepEqual(await c.echo("still here"), "still here");
    assert.equal(c.WS.sockets.length, 1, "no reconnect");
    assert.ok(tokens >= 3);
  } finally {
    await own.stop();
  }
});

test("one refresh chain per connection: a refresh that resolves after a reconnect is dropped", async () => {
  const own = await new Server(keys, { env: { SECURE_WS_JWT_LEEWAY_SECONDS: "0" } }).start();
  const ownKey = apiKey;
  try {
    const sub = uniqueSub();
    let calls = 0;
    let release;
    const held = new Promise((r) => (release = r));
    const c = client({
      url: own.url,
      getToken: () => (++calls === 2 ? held.then(() => keys.issue({ sub, ttl: 4 })) : keys.issue({ sub, ttl: 4 })),
    });
    await c.connect();
    await waitFor(() => calls === 2, 5000, "the first refresh asks for a token");
    await own.api(ownKey, "disconnect", { sub });
    await waitFor(() => c.WS.sockets.length === 2 && c.state === "connected", 10000, "reconnected");
    release();
    const socket = c.WS.sockets[1];
    const times = [];
    const send = socket.send.bind(socket);
    socket.send = (data) => {
      if (JSON.parse(data).type === "refresh") times.push(Date.now());
      send(data);
    };
    await new Promise((r) => setTimeout(r, 4500));
    assert.ok(times.length >= 1 && times.length <= 3, `refreshes: ${times.length}`);
    for (let i = 1; i < times.length; i++) assert.ok(times[i] - times[i - 1] > 700, `two refreshes ${times[i] - times[i - 1]} ms apart`);
    assert.equal(c.WS.sockets[0].sent.filter((f) => f.type === "refresh").length, 0, "the stale refresh went nowhere");
    assert.equal(c.state, "connected");
  } finally {
    await own.stop();
  }
});

test("a revoked token stops the client with AuthError and no reconnect", async () => {
  const sub = uniqueSub();
  const c = client({ getToken: () => keys.issue({ sub }) });
  const errors = [];
  c.on("error", (e) => errors.push(e));
  const seen = states(c);
  await c.connect();
  await server.api(apiKey, "revoke", { sub });
  await waitFor(() => c.state === "closed", 5000, "closed");
  assert.equal(errors.length, 1);
  assert.ok(errors[0] instanceof AuthError);
  assert.equal(errors[0].code, 1008);
  assert.equal(errors[0].reason, "token revoked");
  assert.deepEqual(seen, ["connecting", "connected", "closed"]);
  await new Promise((r) => setTimeout(r, 700));
  assert.equal(c.WS.sockets.length, 1, "no reconnect");
  await assert.rejects(c.echo(1), AuthError);
  await assert.rejects(c.connect(), AuthError);
  // And at the handshake: connect() rejects with it.
  const d = client({ getToken: () => keys.issue({ sub, iat: Math.floor(Date.now() / 1000) - 60 }) });
  await assert.rejects(d.connect(), (e) => e instanceof AuthError && e.reason === "token revoked");
  assert.equal(d.WS.sockets.length, 1);
});

test("an invalid token is fatal at once", async () => {
  const c = client({ getToken: () => "not.a.jwt" });
  await assert.rejects(c.connect(), (e) => e instanceof AuthError && e.code === 1008 && e.reason === "invalid token");
  assert.equal(c.WS.sockets.length, 1);
  assert.equal(c.state, "closed");
});

test("an expired token from the provider does not loop forever", async () => {
  let calls = 0;
  const c = client({ getToken: () => (calls++, keys.issue({ ttl: -600 })), maxExpiredRetries: 3 });
  const started = Date.now();
  await assert.rejects(c.connect(), (e) => e instanceof AuthError && e.reason === "token expired");
  assert.equal(calls, 3, "a fresh token for each of the 3 attempts");
  assert.equal(c.WS.sockets.length, 3);
  assert.ok(Date.now() - started < 10000);
});

test("too many connections is retried with backoff until a slot frees", async () => {
  const own = await new Server(keys, { env: { SECURE_WS_MAX_CONNECTIONS_PER_CLIENT: "1" } }).start();
  try {
    const sub = uniqueSub();
    const a = client({ url: own.url, getToken: () => keys.issue({ sub }) });
    await a.connect();
    const b = client({ url: own.url, getToken: () => keys.issue({ sub }) });
    const connected = b.connect();
    await waitFor(() => b.WS.sockets.length >= 3, 10000, "b retries");
    a.close();
    await connected;
    assert.equal(b.welcome.sub, sub);
  } finally {
    await own.stop();
  }
});

test("close() leaves no timer, listener or pending request behind", async () => {
  clients.forEach((other) => other.close());
  await waitFor(() => clients.every((other) => other.WS.sockets.every((ws) => ws.readyState === 3)), 5000, "other clients closed");
  const channel = uniqueChannel();
  const c = client({ refreshBefore: 5000 });
  const seen = states(c);
  await c.connect();
  const sub = c.subscribe(channel, { onMessage: () => {} });
  await sub.ready;
  const slow = c.call("slow", 2);
  c.close();
  await assert.rejects(slow, (e) => e instanceof RequestError && e.code === "closed");
  await assert.rejects(c.connect(), (e) => e instanceof RequestError && e.code === "closed");
  assert.deepEqual(seen, ["connecting", "connected", "closed"]);
  const socket = c.WS.sockets[0];
  await waitFor(() => socket.readyState === 3, 5000, "socket closed");
  assert.equal(socket.listenerCount("message") + socket.listenerCount("close"), 0);
  assert.deepEqual(process.getActiveResourcesInfo().filter((r) => r === "Timeout"), [], "no timer left");
  c.close(); // idempotent
});

test("stream: chunks in order, abort sends cancel, leaving early sends cancel", async (t) => {
  const c = client();
  await c.connect();
  const all = [];
  for await (const chunk of c.stream("count", { n: 5 })) all.push(chunk.i);
  assert.deepEqual(all, [0, 1, 2, 3, 4]);

  const controller = new AbortController();
  const seen = [];
  await assert.rejects(
    (async () => {
      for await (const chunk of c.stream("count", { n: 1000, every: 0.05 }, { signal: controller.signal })) {
        seen.push(chunk.i);
        if (seen.length === 3) controller.abort(new Error("enough"));
      }
    })(),
    /enough/,
  );
  assert.deepEqual(seen, [0, 1, 2]);
  const socket = c.WS.sockets[0];
  const cancels = () => socket.sent.filter((f) => f.type === "cancel");
  assert.equal(cancels().length, 1);

  for await (const chunk of c.stream("count", { n: 1000, every: 0.05 })) if (chunk.i === 1) break;
  assert.equal(cancels().length, 2);
  await waitFor(async () => (await c.call("features")).streams_finished >= 3, 5000, "the server closed both generators");
});
