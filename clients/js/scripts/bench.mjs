// Echo round trips through the client against a bare `ws` loop, on the same secure_ws server, in one run.
//
//   npm run build && node scripts/bench.mjs [--seconds 3] [--rounds 4] [--connections 4]
//
// The server is this repository's (uvicorn over TLS, the dev CA, a rate limit too high to refuse). Each round
// runs both sides for --seconds, interleaved (A B, B A, …) so a noisy machine moves both alike: `connections`
// sockets, each with one echo in flight, sequentially. The bare loop writes the same JSON frames by hand and
// matches nothing but the next frame: the floor any client pays. Printed: round trips/s of each, the ratio
// client / bare per round and its median; this Node process's CPU time per round trip on each side (what the
// client itself costs, the figure least moved by a busy server); and the browser bundle's size (esbuild,
// minified + gzip).
import { WebSocket } from "ws";
import { execFileSync } from "node:child_process";
import { Client } from "../dist/index.js";
import { makeKeydir, Server } from "../test/harness.mjs";

const args = process.argv.slice(2);
const option = (name, fallback) => (args.includes(name) ? Number(args[args.indexOf(name) + 1]) : fallback);
const seconds = option("--seconds", 1.5);
const rounds = option("--rounds", 16);
const connections = option("--connections", 4);

async function viaClient(url, token, ca) {
  const clients = Array.from({ length: connections }, () => new Client(url, { getToken: () => token, WebSocket, socketOptions: { ca, perMessageDeflate: false } }));
  await Promise.all(clients.map((c) => c.connect()));
  let count = 0;
  const until = Date.now() + seconds * 1000;
  await Promise.all(
    clients.map(async (c) => {
      for (let i = 0; Date.now() < until; i++, count++) await c.echo(i);
    }),
  );
  clients.forEach((c) => c.close());
  return count / seconds;
}

async function bare(url, token, ca) {
  const sockets = await Promise.all(
    Array.from({ length: connections }, () => new Promise((resolve, reject) => {
      const ws = new WebSocket(url, ["secure-ws.v1", `bearer.${token}`], { ca, perMessageDeflate: false });
      ws.once("message", () => resolve(ws)); // the welcome
      ws.once("error", reject);
    })),
  );
  let count = 0;
  const until = Date.now() + seconds * 1000;
  await Promise.all(
    sockets.map(
      (ws) =>
        new Promise((resolve) => {
          let i = 0;
          const next = () => {
            if (Date.now() >= until) return resolve();
            ws.send(JSON.stringify({ type: "echo", id: ++i, data: i }));
          };
          ws.on("message", (raw) => {
            if (JSON.parse(raw).id === i) count++;
            next();
          });
          next();
        }),
    ),
  );
  sockets.forEach((ws) => ws.close());
  return count / seconds;
}

const keys = makeKeydir();
const server = await new Server(keys, { env: { SECURE_WS_RATE_LIMIT: "1000000/second" } }).start();
try {
  const token = keys.issue({ ttl: 3600 });
  const ratios = [];
  const cpu = { client: [0, 0], bare: [0, 0] }; // µs of this process's CPU, round trips
  await viaClient(server.url, token, keys.ca); // warm-up
  for (let round = 0; round < rounds; round++) {
    const order = round % 2 ? ["bare", "client"] : ["client", "bare"];
    const result = {};
    for (const side of order) {
      const before = process.cpuUsage();
      result[side] = await (side === "client" ? viaClient : bare)(server.url, token, keys.ca);
      const used = process.cpuUsage(before);
      cpu[side][0] += used.user + used.system;
      cpu[side][1] += result[side] * seconds;
    }
    ratios.push(result.client / result.bare);
    console.log(`round ${round + 1}: client ${result.client.toFixed(0)}/s  bare ws ${result.bare.toFixed(0)}/s  ratio ${(result.client / result.bare).toFixed(2)}`);
  }
  ratios.sort((a, b) => a - b);
  const median = ratios.length % 2 ? ratios[(ratios.length - 1) / 2] : (ratios[ratios.length / 2 - 1] + ratios[ratios.length / 2]) / 2;
  const perTrip = (side) => cpu[side][0] / cpu[side][1];
  console.log(`node CPU per round trip: client ${perTrip("client").toFixed(1)} µs, bare ws ${perTrip("bare").toFixed(1)} µs`);
  const size = JSON.parse(execFileSync(process.execPath, [new URL("./bundle.mjs", import.meta.url).pathname], { encoding: "utf8" }).trim());
  console.log(JSON.stringify({ echo_ratio_median: Number(median.toFixed(3)), cpu_ratio_bare_over_client: Number((perTrip("bare") / perTrip("client")).toFixed(3)), connections, seconds, rounds, bundle_bytes: size.bytes, bundle_gzip_bytes: size.gzip }));
} finally {
  await server.stop();
}
