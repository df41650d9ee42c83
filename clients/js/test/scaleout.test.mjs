// Two workers sharing a throw-away Redis: the worker holding the client's connection is killed (SIGKILL) while
// messages keep coming; the client reconnects to the other worker and recovers every message once, in order.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Client } from "../dist/index.js";
import { makeKeydir, Server, startRedis, uniqueSub, uniqueChannel, waitFor, unhandled } from "./harness.mjs";

let keys, redis, server, apiKey;

before(async () => {
  keys = makeKeydir();
  apiKey = keys.apiKey();
  redis = await startRedis();
  server = await new Server(keys, { workers: 2, env: { SECURE_WS_STORAGE_URL: redis.url, SECURE_WS_HISTORY_SIZE: "1000" } }).start();
});

after(async () => {
  await server?.stop();
  redis?.stop();
  assert.deepEqual(unhandled, [], "no unhandled rejection");
});

test("killing the worker that holds the connection: reconnect, recover, no gap, no duplicate", async () => {
  const sub = uniqueSub();
  const channel = uniqueChannel();
  const WS = keys.WebSocket();
  const c = new Client(server.url, { getToken: () => keys.issue({ sub }), WebSocket: WS, backoffInitial: 50, backoffMax: 500 });
  const got = [];
  const failed = [];
  try {
    await c.connect();
    await c.subscribe(channel, { onMessage: (m) => got.push(m), onRecoveryFailed: (ch) => failed.push(ch) }).ready;
    const count = 150;
    let published = 0;
    const publishing = (async () => {
      while (published < count) {
        try {
          await server.api(apiKey, "publish", { channel, data: published + 1 });
          published++;
        } catch {
          // the request landed on the worker being killed: publish the same number again
        }
      }
    })();
    await waitFor(() => published >= 40, 20000, "publishing");
    const port = WS.sockets[0]._socket.localPort;
    const pid = server.workerHolding(port);
    assert.ok(pid, "found the worker holding the connection");
    process.kill(pid, "SIGKILL");
    await waitFor(() => WS.sockets.length >= 2 && c.state === "connected", 15000, "reconnected to a live worker");
    await publishing;
    await waitFor(() => got.length >= count, 15000, `all ${count} messages (got ${got.length})`);
    const offsets = got.map((m) => m.offset);
    assert.deepEqual(offsets, Array.from({ length: offsets.length }, (_, i) => i + 1), "offsets 1…N, no gap, no duplicate");
    const data = got.map((m) => m.data);
    assert.ok(data.every((d, i) => i === 0 || d >= data[i - 1]) && data.at(-1) === count, "published order kept"); // a publish retried after the kill may repeat a number
    assert.deepEqual(failed, []);
  } finally {
    c.close();
  }
});
