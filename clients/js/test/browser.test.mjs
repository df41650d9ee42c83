// The browser bundle in a real headless Chromium (Debian's, driven by playwright-core), over wss with the dev
// certificate trusted by its SPKI pin only. The page is the server's /demo, whose CSP lets it import the bundle the
// server serves; the client there uses the subprotocol transport (the only one a browser has).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash, X509Certificate } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { makeKeydir, Server, uniqueSub, uniqueChannel, waitFor, unhandled } from "./harness.mjs";

const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const skip = existsSync(CHROMIUM) ? false : `needs Debian's Chromium at ${CHROMIUM} (apt-get install chromium)`;

let keys, server, apiKey, browser, page;
const websockets = [];
const problems = [];

before(async () => {
  if (skip) return;
  const { chromium } = await import("playwright-core");
  keys = makeKeydir();
  apiKey = keys.apiKey();
  server = await new Server(keys, { env: { SECURE_WS_DEMO: "1", SECURE_WS_ALLOWED_ORIGINS: "*", SECURE_WS_HISTORY_SIZE: "1000" } }).start();
  const spki = new X509Certificate(readFileSync(join(keys.dir, "server.crt"))).publicKey.export({ type: "spki", format: "der" });
  const pin = createHash("sha256").update(spki).digest("base64");
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", `--ignore-certificate-errors-spki-list=${pin}`],
  });
  const context = await browser.newContext({ ignoreHTTPSErrors: false });
  page = await context.newPage();
  page.setDefaultTimeout(15000);
  page.on("websocket", (ws) => websockets.push(ws.url()));
  page.on("pageerror", (e) => problems.push(String(e)));
  page.on("console", (m) => m.type() === "error" && problems.push(m.text()));
  await page.goto(`https://localhost:${server.port}/demo`);
  await page.evaluate(async () => {
    const { Client, AuthError } = await import("/demo/secure-ws-client.js");
    window.lib = { Client, AuthError };
    window.rejections = [];
    window.addEventListener("unhandledrejection", (e) => window.rejections.push(String(e.reason)));
  });
});

after(async () => {
  if (page) assert.deepEqual(await page.evaluate(() => window.rejections), [], "no unhandled rejection in the page");
  await browser?.close();
  await server?.stop();
  assert.deepEqual(unhandled, []);
  assert.deepEqual(problems, []);
});

test("in Chromium: connect by subprotocol, subscribe, receive, recover after the server cuts it", { skip }, async () => {
  const sub = uniqueSub("browser");
  const channel = uniqueChannel();
  const token = keys.issue({ sub });
  const welcomed = await page.evaluate(
    async ({ url, token, channel }) => {
      const t = (window.t = { got: [], states: [], failed: [] });
      const client = (window.client = new window.lib.Client(url, { getToken: async () => token, backoffInitial: 50, backoffMax: 500 }));
      client.on("state", (s) => t.states.push(s));
      await client.connect();
      await client.subscribe(channel, { onMessage: (m) => t.got.push(m), onRecoveryFailed: (c) => t.failed.push(c) }).ready;
      return client.welcome.sub;
    },
    { url: server.url, token, channel },
  );
  assert.equal(welcomed, sub);
  assert.ok(websockets.length >= 1 && websockets.every((u) => u === server.url), "no token in the URL: the subprotocol carried it");

  const count = 90;
  let published = 0;
  const publishing = (async () => {
    for (; published < count; published++) await server.api(apiKey, "publish", { channel, data: published + 1 });
  })();
  for (let cut = 0; cut < 2; cut++) {
    await waitFor(() => published >= (cut + 1) * 30, 20000, "publishing");
    const before = websockets.length;
    await server.api(apiKey, "disconnect", { sub });
    await waitFor(async () => websockets.length > before && (await page.evaluate(() => window.client.state)) === "connected", 10000, "reconnected");
  }
  await publishing;
  const got = await waitFor(async () => {
    const got = await page.evaluate(() => window.t.got);
    return got.length >= count && got;
  }, 10000, "every message");
  assert.deepEqual(got.map((m) => m.offset), Array.from({ length: count }, (_, i) => i + 1), "no gap, no duplicate, in order");
  assert.deepEqual(await page.evaluate(() => window.t.failed), []);
  assert.ok((await page.evaluate(() => window.t.states)).filter((s) => s === "disconnected").length >= 2);
});

test("in Chromium: stream and cancel", { skip }, async (t) => {
  const result = await page.evaluate(async () => {
    const all = [];
    for await (const chunk of window.client.stream("count", { n: 4 })) all.push(chunk.i);
    const controller = new AbortController();
    const seen = [];
    let error = "";
    try {
      for await (const chunk of window.client.stream("count", { n: 1000, every: 0.05 }, { signal: controller.signal })) {
        seen.push(chunk.i);
        if (seen.length === 2) controller.abort(new Error("enough"));
      }
    } catch (e) {
      error = e.message;
    }
    return { all, seen, error };
  });
  assert.deepEqual(result, { all: [0, 1, 2, 3], seen: [0, 1], error: "enough" });
  await waitFor(async () => (await page.evaluate(() => window.client.call("features"))).streams_finished >= 2, 5000, "the server closed the generator");
});

test("in Chromium: close() ends it, and a revoked token is an AuthError", { skip }, async () => {
  const sub = uniqueSub("browser");
  const token = keys.issue({ sub });
  await page.evaluate(() => window.client.close());
  const pending = page.evaluate(async ({ url, token }) => {
    const client = (window.second = new window.lib.Client(url, { getToken: async () => token }));
    await client.connect();
    return new Promise((resolve) => client.on("error", (e) => resolve({ auth: e instanceof window.lib.AuthError, code: e.code, reason: e.reason, state: client.state })));
  }, { url: server.url, token });
  await waitFor(() => page.evaluate(() => window.second?.state === "connected"), 5000, "connected");
  await server.api(apiKey, "revoke", { sub });
  assert.deepEqual(await pending, { auth: true, code: 1008, reason: "token revoked", state: "closed" });
});

test("in Chromium: coming back online ends the backoff wait at once", { skip }, async () => {
  const sub = uniqueSub("browser");
  const token = keys.issue({ sub });
  await page.evaluate(async ({ url, token }) => {
    window.third = new window.lib.Client(url, { getToken: async () => token, backoffInitial: 60000, backoffMax: 60000, random: () => 0.999 });
    await window.third.connect();
  }, { url: server.url, token });
  await server.api(apiKey, "disconnect", { sub });
  await waitFor(() => page.evaluate(() => window.third.state === "disconnected"), 5000, "waiting out a 60 s backoff");
  await page.evaluate(() => window.dispatchEvent(new Event("online")));
  await waitFor(() => page.evaluate(() => window.third.state === "connected"), 5000, "reconnected on 'online'");
  await page.evaluate(() => window.third.close());
});
