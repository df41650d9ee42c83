// Socket.IO on Node for scripts/bench.py's fan-out comparison: HTTPS with the bench's certificate, the
// websocket transport only, no compression. A "pub" event from one client is broadcast as "msg" to every other.
//
//     node scripts/socketio_fan/server.js PORT CERTFILE KEYFILE   (after `npm ci` in this folder)
"use strict";
const fs = require("fs");
const https = require("https");
const { Server } = require("socket.io");

const [port, certfile, keyfile] = process.argv.slice(2);
const server = https.createServer({ cert: fs.readFileSync(certfile), key: fs.readFileSync(keyfile) });
const io = new Server(server, { transports: ["websocket"], perMessageDeflate: false, serveClient: false });
io.on("connection", (socket) => {
  socket.on("pub", (data) => socket.broadcast.emit("msg", data));
});
server.listen(Number(port), "127.0.0.1");
