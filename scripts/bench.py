#!/usr/bin/env python3
"""Side-by-side benchmark: secure_ws against a bare Starlette echo server.

    python scripts/bench.py [--quick] [--mode uvicorn|serve] [--rounds N] [--seconds S]

Both servers run under the same uvicorn, with the same TLS certificate, and
are driven by the same load generator in the same run, in interleaved rounds
(A B, B A, …), so a noisy shared machine moves both alike. Only ratios
secure_ws / bare are meant to be compared across machines.

* ``--mode uvicorn``: ``uvicorn bench_app:app`` (``secure_ws.main:app`` plus one Python handler, see
  ``scripts/bench_app.py``) with uvicorn's defaults, as the SPEC's plain command line runs it, against
  the bare app on the same defaults.
* ``--mode serve``: ``secure-ws serve bench_app:api`` (its tuned uvicorn settings) against the bare app
  on *default* uvicorn — what an operator gets from each out of the box.

secure_ws runs its full path: JWT handshake (EdDSA), per-sub rate limiter (set
high enough never to refuse, but hit on every frame), JSON protocol. The load
generator is a minimal WebSocket client over asyncio + TLS in several
processes (pre-masked frames, no compression offered — like most native mobile
clients); its CPU use is printed so you can see it is not the bottleneck.

Measured, for each server:
  frames/s      round trips per second, 50 connections each with one frame in flight
  p50/p99       round-trip latency of those frames
  CPU/frame     the server's CPU time per round trip: on a machine whose cores the load
                generator shares, the ratio least moved by the load generator's own limits
  handler       (--mode uvicorn) the same round trips to a Python handler (``bench.echo``,
                ``{"type":"result"}`` replies) on the same secure_ws server: its CPU per round
                trip against the built-in echo's
  streams       (--mode uvicorn) streamed calls (``bench.stream``, 1,000 chunks of 12 characters each, 6
                connections reading as fast as they can): the server's CPU per chunk against a handler
                call's round trip (``bench.echo`` above) in the same run; and (both modes) the time
                from sending ``cancel`` to reading ``cancelled`` (sent once the generator's ``finally``
                ran), median and max of 100
  handshakes/s  new TLS connection + upgrade (+ welcome frame for secure_ws), 16 in parallel
  idle KiB/conn server RSS growth per idle connection, at 2,000 connections
  fan-out       1,000 subscribers (--subscribers), a publisher sending a burst of messages (--fanout-gap S: one
                message every S seconds instead, so that no two publications share a loop turn): deliveries/s and
                p50/p99 publish-to-delivery latency (which includes waiting behind the burst),
                and the server's CPU time per delivery; for secure_ws also the same burst published
                through the server API (POST /api/publish on 5 keep-alive connections): its
                deliveries/s against the WebSocket client's
  TestServer    (--mode uvicorn) CPU per ``bench.echo`` call with the Python client, sequential: in process with
                ``secure_ws.testing.TestServer`` (client and server in this process) against the same calls
                over real TLS on loopback to the server above (this process's CPU plus the server's)
  history       (secure_ws only) the server's CPU per ``publish`` round trip with channel history
                on (SECURE_WS_HISTORY_SIZE=100) against a second secure_ws with it off, and the
                server's CPU time (and the wall time, client included) to recover 100 missed
                messages: a subscribe with ``since`` answered by ``subscribed`` and the 100 replayed
  peers         (fan-out against other servers: same subscribers, same burst, same TLS certificate) the server's
                CPU per delivery for a raw picows broadcaster (``scripts/picows_fan.py``: the frame built once and
                written to each transport; ``pip install picows``) and Socket.IO on Node (``scripts/socketio_fan``:
                websocket transport, ``npm ci`` there on first use), against secure_ws's
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import resource
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOADGEN_PROCS = 3
PAYLOAD = b'{"type":"echo","data":"hello, world"}'
HANDLER_PAYLOAD = b'{"type":"bench.echo","data":"hello, world"}'
PUBLISH_PAYLOAD = b'{"type":"publish","channel":"bench","data":"hello, world"}'
SUBSCRIBE_PAYLOAD = b'{"type":"subscribe","channel":"bench"}'  # a held channel re-subscribed: the whole subscribe path
CHANNEL_PATTERNS = 50  # rules in the channels phase's SECURE_WS_CHANNELS_FILE, none of them matching "bench"
API_CONNECTIONS = 5  # a backend's pool posting at once in the API fan-out row
RECOVERED = 100  # messages replayed per recovery in the history phase
STREAM_CHUNKS = 1000  # chunks per streamed call in the stream phase, each as small as the echo's data
STREAM_PAYLOAD = b'{"type":"bench.stream","id":1,"data":{"n":%d,"size":12}}' % STREAM_CHUNKS
CANCELS = 100  # cancels timed in the cancel phase

# -- a minimal WebSocket client ------------------------------------------------------------


def client_frame(payload: bytes, opcode: int = 1, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


async def ws_open(port: int, ctx: ssl.SSLContext, path: str, headers: str = "") -> tuple:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost", limit=1 << 20)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"upgrade refused: {head[:80]!r}")
    return reader, writer


async def ws_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Next text/binary payload; answers pings, raises on close."""
    while True:
        b0, b1 = await reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await reader.readexactly(8))
        payload = await reader.readexactly(n) if n else b""
        opcode = b0 & 0x0F
        if opcode in (1, 2, 0):
            return payload
        if opcode == 9:
            writer.write(client_frame(payload, 10))
        elif opcode == 8:
            raise ConnectionError(f"closed {payload[:2].hex()} {payload[2:]!r}")


def client_ssl(ca: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca)


# -- load generator processes --------------------------------------------------------------


def _loadgen(job: dict, out: mp.Queue) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    cpu0 = time.process_time()
    result = asyncio.run(JOBS[job["kind"]](job))
    result["cpu"] = time.process_time() - cpu0
    out.put(result)


SOCKETIO_PATH = "/socket.io/?EIO=4&transport=websocket"


async def socketio_join(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Engine.IO's open packet, then a connect to the default namespace and its answer."""
    await ws_read(reader, writer)  # 0{"sid":…}
    writer.write(client_frame(b"40"))
    await ws_read(reader, writer)  # 40{"sid":…}


def stamp_of(job: dict, payload: bytes) -> float | None:
    """The publisher's send time carried by a delivered message; None for what is not one (a Socket.IO ping)."""
    if job["flavor"] == "socketio":
        if not payload.startswith(b"42"):
            return None
        return float(json.loads(payload[2:])[1])
    return float(json.loads(payload)["data"]) if job["welcome"] else float(payload)


def auth_header(job: dict, i: int) -> str:
    tokens = job.get("tokens")
    return f"Authorization: Bearer {tokens[i % len(tokens)]}\r\n" if tokens else ""


async def open_all(job: dict, then: bytes | None = None) -> list[tuple]:
    """The job's connections, each past secure_ws's welcome (and the reply to ``then``, if given)."""
    ctx = client_ssl(job["ca"])
    conns = [await ws_open(job["port"], ctx, job["path"], auth_header(job, i)) for i in range(job["conns"])]
    if job["flavor"] == "socketio":
        for r, w in conns:
            await socketio_join(r, w)
    if job["welcome"]:
        for r, w in conns:
            await ws_read(r, w)
            if then is not None:
                w.write(then)
                await ws_read(r, w)
    return conns


class Frames(asyncio.Protocol):
    """A connection taken over from its stream once it is open: a callback per frame instead of StreamReader
    coroutines, so the load generator spends little CPU per frame and leaves the cores to the server it
    measures. Subclasses handle each text frame in :meth:`text`; ``done`` resolves with ``count``."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.buffer = b""
        self.count = 0
        self.done = asyncio.get_running_loop().create_future()
        transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        while len(buffer) >= 2:
            size, at = buffer[1] & 0x7F, 2
            if size == 126:
                size, at = int.from_bytes(buffer[2:4], "big"), 4
            elif size == 127:
                size, at = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < at + size:
                break
            opcode, payload, buffer = buffer[0] & 0x0F, buffer[at : at + size], buffer[at + size :]
            if opcode == 9:
                self.transport.write(client_frame(payload, 10))
            elif opcode == 8:
                self.connection_lost(ConnectionError(f"closed {payload[:2].hex()} {payload[2:]!r}"))
                return
            elif opcode in (1, 2) and not self.text(payload):
                self.connection_lost(None)
                return
        self.buffer = buffer

    def text(self, payload: bytes) -> bool:
        """Handle one text frame; False when this connection is done."""
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(self.count)
            else:
                self.done.set_exception(exc)


class RoundTrips(Frames):
    """One connection of the throughput phase: one frame in flight, its round trips timed."""

    def __init__(self, transport: asyncio.Transport, frame: bytes, deadline: float, rtts: list[float]) -> None:
        super().__init__(transport)
        self.frame, self.deadline, self.rtts = frame, deadline, rtts
        self.sent = time.perf_counter()
        transport.write(frame)

    def text(self, payload: bytes) -> bool:
        now = time.perf_counter()
        self.rtts.append(now - self.sent)
        self.count += 1
        if now >= self.deadline:
            return False
        self.sent = now
        self.transport.write(self.frame)
        return True


class StreamRounds(Frames):
    """One connection of the stream phase: one stream of STREAM_CHUNKS chunks in flight, its chunks counted."""

    def __init__(self, transport: asyncio.Transport, deadline: float) -> None:
        super().__init__(transport)
        self.deadline = deadline
        self.request = client_frame(STREAM_PAYLOAD)
        transport.write(self.request)

    def text(self, payload: bytes) -> bool:
        if payload.startswith(b'{"type":"chunk"'):
            self.count += 1
            return True
        if not payload.startswith(b'{"type":"result"'):
            raise RuntimeError(f"stream failed: {payload[:200]!r}")
        if time.perf_counter() >= self.deadline:
            return False
        self.transport.write(self.request)
        return True


async def job_throughput(job: dict) -> dict:
    conns = await open_all(job)
    frame = client_frame(job.get("payload", PAYLOAD))
    rtts: list[float] = []
    await asyncio.sleep(max(0.0, job["start_at"] - time.time()))
    t0 = time.perf_counter()
    deadline = t0 + job["seconds"]
    clients = [RoundTrips(w.transport, frame, deadline, rtts) for _, w in conns]
    count = sum(await asyncio.gather(*(c.done for c in clients)))
    elapsed = time.perf_counter() - t0
    for c in clients:
        c.transport.close()
    return {"count": count, "elapsed": elapsed, "rtts": rtts[:: max(1, len(rtts) // 20000)]}


async def job_streams(job: dict) -> dict:
    conns = await open_all(job)
    await asyncio.sleep(max(0.0, job["start_at"] - time.time()))
    t0 = time.perf_counter()
    clients = [StreamRounds(w.transport, t0 + job["seconds"]) for _, w in conns]
    count = sum(await asyncio.gather(*(c.done for c in clients)))
    elapsed = time.perf_counter() - t0
    for c in clients:
        c.transport.close()
    return {"count": count, "elapsed": elapsed}


async def job_handshakes(job: dict) -> dict:
    ctx = client_ssl(job["ca"])
    count = 0
    await asyncio.sleep(max(0.0, job["start_at"] - time.time()))
    deadline = time.perf_counter() + job["seconds"]

    async def loop(i: int) -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            # Done at the 101 for both servers: the load generator, on the same 2 cores, must not pay
            # for reading secure_ws's welcome frame (the server still sends it).
            reader, writer = await ws_open(job["port"], ctx, job["path"], auth_header(job, i))
            writer.transport.abort()
            count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(job["parallel"])))
    return {"count": count, "elapsed": time.perf_counter() - t0}


async def job_idle(job: dict) -> dict:
    conns = await open_all(job)
    job["ready"].set()
    while not job["release"].is_set():
        await asyncio.sleep(0.05)
    for _, w in conns:
        w.transport.abort()
    return {"count": len(conns)}


async def job_subscribers(job: dict) -> dict:
    conns = await open_all(job, then=client_frame(json.dumps({"type": "subscribe", "channel": "bench"}).encode()))
    job["ready"].set()
    latencies: list[float] = []
    expected = job["messages"]

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = 0
        while got < expected:
            sent = stamp_of(job, await asyncio.wait_for(ws_read(reader, writer), 60))
            if sent is None:
                writer.write(client_frame(b"3"))  # Socket.IO's pong
                continue
            latencies.append(time.monotonic() - sent)
            got += 1

    await asyncio.gather(*(one(r, w) for r, w in conns))
    done = time.monotonic()
    for _, w in conns:
        w.transport.abort()
    return {"latencies": latencies[:: max(1, len(latencies) // 20000)], "done": done, "count": len(latencies)}


JOBS = {"throughput": job_throughput, "streams": job_streams, "handshakes": job_handshakes, "idle": job_idle, "subscribers": job_subscribers}


def start_jobs(jobs: list[dict]) -> tuple[mp.Queue, list[mp.Process]]:
    out: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_loadgen, args=(job, out)) for job in jobs]
    for p in procs:
        p.start()
    return out, procs


def collect(out: mp.Queue, procs: list[mp.Process]) -> list[dict]:
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    return results


def run_jobs(jobs: list[dict]) -> list[dict]:
    return collect(*start_jobs(jobs))


# -- servers -------------------------------------------------------------------------------


class Target:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], path: str, fan_path: str, tokens: list[str] | None, secure: bool):
        self.name, self.argv, self.env, self.path, self.fan_path = name, argv, env, path, fan_path
        self.tokens, self.secure = tokens, secure
        self.flavor = "secure" if secure else "raw"  # or "socketio": Socket.IO's framing on top
        self.api_key: str | None = None
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self, folder: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        self.proc = subprocess.Popen(argv, env=self.env, cwd=folder, stdout=subprocess.DEVNULL, stderr=open(folder / f"{self.name}.log", "w"))
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start: {(folder / f'{self.name}.log').read_text()}")

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def base_job(t: Target, ca: str, **extra: object) -> dict:
    return {"port": t.port, "ca": ca, "path": t.path, "welcome": t.secure, "tokens": t.tokens, "flavor": t.flavor, **extra}


def measure_throughput(t: Target, ca: str, seconds: float, conns: int = 50, payload: bytes = PAYLOAD) -> dict:
    cpu0 = t.cpu()
    start_at = time.time() + 1.5  # every process connected before the clock starts
    jobs = [
        base_job(t, ca, kind="throughput", conns=c, seconds=seconds, start_at=start_at, payload=payload)
        for c in split(conns, LOADGEN_PROCS)
    ]
    results = run_jobs(jobs)
    count = sum(r["count"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    rtts = sorted(x for r in results for x in r["rtts"])
    return {
        "fps": count / elapsed,
        "cpu_us": (t.cpu() - cpu0) / count * 1e6,
        "p50": rtts[len(rtts) // 2] * 1e3,
        "p99": rtts[int(len(rtts) * 0.99)] * 1e3,
        "server_cpu": (t.cpu() - cpu0) / (elapsed + 1.5),
        "client_cpu": sum(r["cpu"] for r in results) / elapsed,
    }


def measure_streams(t: Target, ca: str, seconds: float, conns: int = 6) -> dict:
    """Server CPU per streamed chunk: ``conns`` connections each reading streams of STREAM_CHUNKS chunks."""
    cpu0 = t.cpu()
    start_at = time.time() + 1.5
    jobs = [base_job(t, ca, kind="streams", conns=c, seconds=seconds, start_at=start_at) for c in split(conns, LOADGEN_PROCS)]
    results = run_jobs(jobs)
    count = sum(r["count"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    return {"cps": count / elapsed, "cpu_us": (t.cpu() - cpu0) / count * 1e6}


def measure_cancels(t: Target, ca: str, n: int = CANCELS) -> dict:
    """Time from sending ``cancel`` to reading the ``cancelled`` error, which the server sends after the
    generator's ``finally`` has run: an upper bound (a network round trip included) of the time from the
    cancel frame's arrival to that ``finally``. ``n`` calls of ``bench.wait`` on one connection."""

    async def go() -> list[float]:
        reader, writer = await ws_open(t.port, client_ssl(ca), t.path, f"Authorization: Bearer {t.tokens[0]}\r\n")  # type: ignore[index]
        await ws_read(reader, writer)
        took = []
        for i in range(n):
            writer.write(client_frame(b'{"type":"bench.wait","id":%d}' % i))
            await ws_read(reader, writer)  # its one chunk: the generator is waiting
            cancel = client_frame(b'{"type":"cancel","id":%d}' % i)
            started = time.perf_counter()
            writer.write(cancel)
            answer = json.loads(await ws_read(reader, writer))
            took.append(time.perf_counter() - started)
            if answer.get("code") != "cancelled":
                raise RuntimeError(f"cancel not answered: {answer}")
        writer.transport.abort()
        return took

    took = sorted(asyncio.run(go()))
    return {"p50_ms": took[len(took) // 2] * 1e3, "max_ms": took[-1] * 1e3}


def measure_handshakes(t: Target, ca: str, seconds: float, parallel: int = 16) -> dict:
    start_at = time.time() + 0.5
    jobs = [base_job(t, ca, kind="handshakes", parallel=p, seconds=seconds, start_at=start_at) for p in split(parallel, LOADGEN_PROCS)]
    results = run_jobs(jobs)
    elapsed = max(r["elapsed"] for r in results)
    return {"hps": sum(r["count"] for r in results) / elapsed, "client_cpu": sum(r["cpu"] for r in results) / elapsed}


def measure_idle(t: Target, ca: str, conns: int = 2000) -> dict:
    manager = mp.Manager()
    time.sleep(1.0)
    rss0 = t.rss_kib()
    ready = [manager.Event() for _ in range(LOADGEN_PROCS)]
    release = manager.Event()
    jobs = [base_job(t, ca, kind="idle", conns=c, ready=ready[i], release=release) for i, c in enumerate(split(conns, LOADGEN_PROCS))]
    out, procs = start_jobs(jobs)
    for event in ready:
        event.wait(120)
    time.sleep(2.0)  # let the server settle
    rss1 = t.rss_kib()
    release.set()
    collect(out, procs)
    manager.shutdown()
    return {"kib_per_conn": (rss1 - rss0) / conns}


def measure_fanout(t: Target, ca: str, subscribers: int = 1000, messages: int = 50, api_key: str | None = None,
                   gap: float = 0.0) -> dict:
    """With ``api_key``, the burst is published through the server API (``POST /api/publish``, on
    API_CONNECTIONS keep-alive connections at once) instead of by a WebSocket client. With ``gap`` (seconds), the
    WebSocket publisher waits that long after each message instead of sending a burst: each publication then fans
    out on its own, with nothing to write together with it."""
    manager = mp.Manager()
    ready = [manager.Event() for _ in range(LOADGEN_PROCS)]
    jobs = [
        {**base_job(t, ca, kind="subscribers", conns=c, ready=ready[i], messages=messages), "path": t.fan_path}
        for i, c in enumerate(split(subscribers, LOADGEN_PROCS))
    ]
    out, procs = start_jobs(jobs)
    for event in ready:
        event.wait(120)
    cpu0 = t.cpu()

    async def publish() -> float:
        ctx = client_ssl(ca)
        header = f"Authorization: Bearer {t.tokens[-1]}\r\n" if t.tokens else ""
        reader, writer = await ws_open(t.port, ctx, t.fan_path, header)
        if t.secure:
            await ws_read(reader, writer)
        elif t.flavor == "socketio":
            await socketio_join(reader, writer)
        # A burst, as fast as the publisher can write: deliveries/s is then what the server can fan out,
        # not the publisher's pace (a paced publisher hides the capacity of whichever server keeps up).
        started = time.monotonic()
        for _ in range(messages):
            stamp = repr(time.monotonic())
            if t.secure:
                text = json.dumps({"type": "publish", "channel": "bench", "data": stamp})
            elif t.flavor == "socketio":
                text = "42" + json.dumps(["pub", stamp])
            else:
                text = stamp
            writer.write(client_frame(text.encode()))
            if gap:
                await writer.drain()
                await asyncio.sleep(gap)
        await writer.drain()
        if t.secure:
            for _ in range(messages):
                await ws_read(reader, writer)  # "published"
        return started

    async def publish_over_api() -> float:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"}
        async with httpx.AsyncClient(verify=client_ssl(ca), base_url=f"https://127.0.0.1:{t.port}", headers=headers) as http:
            started = time.monotonic()

            async def post(count: int) -> None:
                for _ in range(count):
                    body = {"channel": "bench", "data": repr(time.monotonic())}
                    (await http.post("/api/publish", json=body)).raise_for_status()

            await asyncio.gather(*(post(n) for n in split(messages, API_CONNECTIONS)))
            return started

    started = asyncio.run(publish() if api_key is None else publish_over_api())
    results = collect(out, procs)
    cpu = t.cpu() - cpu0
    manager.shutdown()
    lat = sorted(x for r in results for x in r["latencies"])
    done = max(r["done"] for r in results)
    count = sum(r["count"] for r in results)
    return {
        "dps": count / (done - started),
        "cpu_us": cpu / count * 1e6,
        "p50": lat[len(lat) // 2] * 1e3,
        "p99": lat[int(len(lat) * 0.99)] * 1e3,
    }


def measure_recovery(t: Target, ca: str, rounds: int) -> dict:
    """The server's CPU and the wall time per recovery of RECOVERED messages, on one connection that
    re-subscribes with ``since`` (a held channel: each round replays the same RECOVERED)."""

    async def go() -> dict:
        reader, writer = await ws_open(t.port, client_ssl(ca), t.path, f"Authorization: Bearer {t.tokens[0]}\r\n")  # type: ignore[index]
        await ws_read(reader, writer)
        for _ in range(RECOVERED):
            writer.write(client_frame(PUBLISH_PAYLOAD))
            await ws_read(reader, writer)
        writer.write(client_frame(b'{"type":"subscribe","channel":"bench"}'))
        position = json.loads(await ws_read(reader, writer))
        since = {"offset": position["offset"] - RECOVERED, "epoch": position["epoch"]}
        ask = client_frame(json.dumps({"type": "subscribe", "channel": "bench", "since": since}).encode())
        cpu0, started = t.cpu(), time.perf_counter()
        for _ in range(rounds):
            writer.write(ask)
            reply = json.loads(await ws_read(reader, writer))
            if reply.get("recovered") is not True:
                raise RuntimeError(f"recovery refused: {reply}")
            for _ in range(RECOVERED):
                await ws_read(reader, writer)
        wall, cpu = time.perf_counter() - started, t.cpu() - cpu0
        writer.transport.abort()
        return {"cpu_ms": cpu / rounds * 1e3, "wall_ms": wall / rounds * 1e3}

    return asyncio.run(go())


def measure_history(folder: Path, ca: str, secure: Target, seconds: float, rounds: int) -> dict[str, float]:
    """Publish CPU with history on (``secure``) against a copy of it with history off, and one recovery's cost."""
    off = Target("secure_ws_no_history", secure.argv, {**secure.env, "SECURE_WS_HISTORY_SIZE": "0"},
                 secure.path, secure.fan_path, secure.tokens, True)
    off.start(folder)
    try:
        on_cpu, off_cpu = [], []
        for _ in range(rounds):
            on_cpu.append(measure_throughput(secure, ca, seconds, payload=PUBLISH_PAYLOAD)["cpu_us"])
            off_cpu.append(measure_throughput(off, ca, seconds, payload=PUBLISH_PAYLOAD)["cpu_us"])
    finally:
        off.stop()
    recovery = measure_recovery(secure, ca, 50 if seconds < 5 else 300)
    return {"publish_on_us": statistics.median(on_cpu), "publish_off_us": statistics.median(off_cpu), **recovery}


def measure_channels(folder: Path, ca: str, secure: Target, seconds: float, rounds: int) -> dict[str, float]:
    """Server CPU per subscribe and per publish round trip: ``secure`` (no channel rules) against a copy with
    CHANNEL_PATTERNS rules in a channels file (every one tried for "bench" once, then its options remembered), and
    per subscribe against a copy whose "bench" goes through an ``on_subscribe`` hook (bench_app's, on
    BENCH_SUBSCRIBE_HOOK=1) that allows it."""
    rules = folder / "channels.toml"
    rules.write_text("".join(f'[[channels]]\npattern = "room{n}.*"\nhistory_size = {n + 1}\n\n' for n in range(CHANNEL_PATTERNS)))
    rules.chmod(0o600)
    patterned = Target("secure_ws_patterns", secure.argv, {**secure.env, "SECURE_WS_CHANNELS_FILE": str(rules)},
                       secure.path, secure.fan_path, secure.tokens, True)
    hooked = Target("secure_ws_hook", secure.argv, {**secure.env, "BENCH_SUBSCRIBE_HOOK": "1"},
                    secure.path, secure.fan_path, secure.tokens, True)
    found: dict[str, list[float]] = {}
    patterned.start(folder)
    hooked.start(folder)
    try:
        for target in (secure, patterned, hooked):  # a discarded warm-up each
            measure_throughput(target, ca, 2.0, payload=SUBSCRIBE_PAYLOAD)
        for _ in range(rounds):
            for name, target in (("plain", secure), ("patterns", patterned), ("hook", hooked)):
                for kind, payload in (("subscribe", SUBSCRIBE_PAYLOAD), ("publish", PUBLISH_PAYLOAD)):
                    if name == "hook" and kind == "publish":
                        continue
                    m = measure_throughput(target, ca, seconds, payload=payload)
                    found.setdefault(f"{kind}_{name}_us", []).append(m["cpu_us"])
    finally:
        patterned.stop()
        hooked.stop()
    return {key: statistics.median(values) for key, values in found.items()}


# -- main ----------------------------------------------------------------------------------


async def _calls(client: object, calls: int) -> float:
    """CPU seconds of this process for ``calls`` sequential ``bench.echo`` calls (after a warm-up)."""
    for _ in range(50):
        await client.call("bench.echo", "hello, world")  # type: ignore[attr-defined]
    cpu0 = time.process_time()
    for _ in range(calls):
        await client.call("bench.echo", "hello, world")  # type: ignore[attr-defined]
    return time.process_time() - cpu0


def measure_testserver(secure: Target, ca: str, calls: int) -> dict[str, float]:
    """CPU per call: in process (TestServer) and over TLS on loopback (client + server), the same Python client."""
    from bench_app import api

    from secure_ws.client import Client
    from secure_ws.testing import TestServer

    async def in_process() -> float:
        async with TestServer(api, env={"SECURE_WS_RATE_LIMIT": "100000000/second"}) as server:
            async with server.connect(sub="bench") as ws:
                return await _calls(ws, calls)

    async def over_tls() -> float:
        token = (secure.tokens or [""])[0]
        async with Client(f"wss://127.0.0.1:{secure.port}/ws", lambda: token, ssl=client_ssl(ca)) as client:
            server0 = secure.cpu()
            mine = await _calls(client, calls)
            return mine + secure.cpu() - server0

    return {"inproc_us": asyncio.run(in_process()) / calls * 1e6, "tls_us": asyncio.run(over_tls()) / calls * 1e6}


def make_targets(folder: Path, mode: str, storage: str = "memory://", workers: int = 1) -> tuple[Target, Target]:
    from keydir import keydir_env, make_keydir

    from secure_ws.auth.api_keys import ApiKeyFile
    from secure_ws.auth.signing import issue_token
    from secure_ws.settings import load_settings

    make_keydir(folder)
    env = keydir_env(
        folder,
        # Never refuse, but hit the limiter on every frame and handshake: the full path, measured.
        SECURE_WS_RATE_LIMIT="100000000/second",
        SECURE_WS_HANDSHAKE_RATE_LIMIT="100000000/second",
        SECURE_WS_MAX_CONNECTIONS_PER_CLIENT="100000",
        SECURE_WS_STORAGE_URL=storage,
        SECURE_WS_API_KEYS_FILE=str(folder / "api-keys.json"),
        PYTHONPATH=f"{ROOT}:{ROOT / 'scripts'}",  # bench_app, for `secure-ws serve bench_app:api`
    )
    os.environ.update({k: v for k, v in env.items() if k.startswith("SECURE_WS_")})
    settings = load_settings(env_file=None)
    # One token per simulated client (a device reconnects with the token it holds).
    tokens = [issue_token(f"bench-{i}", scope="subscribe:bench publish:bench", ttl=3600, settings=settings) for i in range(200)]
    uvicorn = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}",
               "--ssl-keyfile", str(folder / "server.key"), "--ssl-certfile", str(folder / "server.crt"),
               "--log-level", "warning", "--no-access-log"]
    bare = Target("bare", [*uvicorn, "--app-dir", str(ROOT / "scripts"), "bare_echo:app"], env, "/ws", "/fan", None, False)
    if mode == "serve":
        argv = [sys.executable, "-m", "secure_ws", "serve", "bench_app:api", "--host", "127.0.0.1", "--port", "{port}",
                "--log-level", "warning", "--no-access-log"]
    else:
        argv = [*uvicorn, "--app-dir", str(ROOT / "scripts"), "bench_app:app"]
    if workers > 1:
        argv += ["--workers", str(workers)]
    secure = Target("secure_ws", argv, env, "/ws", "/ws", tokens, True)
    secure.api_key = ApiKeyFile(folder / "api-keys.json").create("bench")  # for the API fan-out row
    return bare, secure


def make_peers(folder: Path) -> tuple[list[Target], list[str]]:
    """The other servers of the fan-out comparison that can run here, and a note for each that cannot."""
    peers, notes = [], []
    cert, key = str(folder / "server.crt"), str(folder / "server.key")
    try:
        import picows  # noqa: F401

        picows_argv = [sys.executable, str(ROOT / "scripts" / "picows_fan.py"), "{port}", cert, key]
        peers.append(Target("picows", picows_argv, dict(os.environ), "/", "/", None, False))
    except ImportError:
        notes.append("picows: not installed (pip install picows)")
    node_dir = ROOT / "scripts" / "socketio_fan"
    if shutil.which("node") is None or shutil.which("npm") is None:
        notes.append("Socket.IO: node and npm are not installed")
    else:
        if not (node_dir / "node_modules" / "socket.io").exists():
            subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=node_dir, check=True)
        io = Target("socket.io", ["node", str(node_dir / "server.js"), "{port}", cert, key], dict(os.environ),
                    SOCKETIO_PATH, SOCKETIO_PATH, None, False)
        io.flavor = "socketio"
        peers.append(io)
    return peers, notes


def ratio_line(name: str, a: list[float], b: list[float], unit: str, higher_is_better: bool = True) -> str:
    ma, mb = statistics.median(a), statistics.median(b)
    return f"{name:<28} {mb:>12.1f} {ma:>12.1f} {unit:<8} {ma / mb:>7.2f}×"


def main() -> None:
    parser = argparse.ArgumentParser(description="secure_ws vs bare Starlette echo, same uvicorn, same TLS")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (< 60 s)")
    parser.add_argument("--mode", choices=("uvicorn", "serve"), default="uvicorn")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--skip", default="",
                        help="comma list of phases to skip: throughput,handshakes,idle,fanout,history,streams,testserver,peers,channels")
    parser.add_argument("--storage", default="memory://", help="secure_ws's SECURE_WS_STORAGE_URL (e.g. redis://127.0.0.1:6379/0)")
    parser.add_argument("--workers", type=int, default=1, help="secure_ws worker processes (use with --storage redis://…)")
    parser.add_argument("--subscribers", type=int, default=1000, help="subscribers in the fan-out phases")
    parser.add_argument("--fanout-gap", type=float, default=0.0,
                        help="seconds the fan-out publisher waits after each message (default 0: a burst)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    skip = set(filter(None, args.skip.split(",")))
    peer_rows: list[tuple[str, float]] = []
    peer_notes: list[str] = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 10000), hard))

    folder = Path(tempfile.mkdtemp(prefix="secure-ws-bench-"))
    bare, secure = make_targets(folder, args.mode, args.storage, args.workers)
    ca = str(folder / "ca.crt")
    results: dict[str, dict[str, list[float]]] = {"bare": {}, "secure_ws": {}}
    cpu_notes: list[str] = []
    history: dict[str, float] = {}
    channels: dict[str, float] = {}
    cancels: dict[str, float] = {}
    try:
        bare.start(folder)
        secure.start(folder)
        order = [bare, secure]
        if "throughput" not in skip:
            for t in order:  # a discarded warm-up: a server's first second of load runs far below its steady state
                measure_throughput(t, ca, 2.0)
        for r in range(rounds):
            for t in order:
                res = results[t.name]
                if "throughput" not in skip:
                    m = measure_throughput(t, ca, seconds)
                    for k in ("fps", "p50", "p99", "cpu_us"):
                        res.setdefault(k, []).append(m[k])
                    cpu_notes.append(
                        f"round {r + 1} {t.name} throughput: {m['fps']:.0f} frames/s, server {m['server_cpu']:.2f} cores, "
                        f"load generator {m['client_cpu']:.2f} cores"
                    )
                    if t is secure and args.mode == "uvicorn":
                        m = measure_throughput(t, ca, seconds, payload=HANDLER_PAYLOAD)
                        res.setdefault("handler_fps", []).append(m["fps"])
                        res.setdefault("handler_cpu_us", []).append(m["cpu_us"])
                        cpu_notes.append(f"round {r + 1} {t.name} handler: {m['fps']:.0f} round trips/s, {m['cpu_us']:.1f} µs CPU each")
                        if "streams" not in skip:
                            m = measure_streams(t, ca, seconds)
                            res.setdefault("chunk_cps", []).append(m["cps"])
                            res.setdefault("chunk_cpu_us", []).append(m["cpu_us"])
                            cpu_notes.append(f"round {r + 1} {t.name} streams: {m['cps']:.0f} chunks/s, {m['cpu_us']:.2f} µs CPU each")
                if t is secure and args.mode == "uvicorn" and "testserver" not in skip:
                    m = measure_testserver(secure, ca, 500 if args.quick else 2000)
                    for k, v in m.items():
                        res.setdefault(k, []).append(v)
                if "handshakes" not in skip:
                    m = measure_handshakes(t, ca, seconds / 2)
                    res.setdefault("hps", []).append(m["hps"])
                    cpu_notes.append(f"round {r + 1} {t.name} handshakes: {m['hps']:.0f}/s, load generator {m['client_cpu']:.2f} cores")
            order.reverse()
        for t in (bare, secure):
            if "idle" not in skip:
                results[t.name]["kib"] = [measure_idle(t, ca)["kib_per_conn"]]
            if "fanout" not in skip:
                m = measure_fanout(t, ca, args.subscribers, messages=20 if args.quick else 50, gap=args.fanout_gap)
                for k, v in (("dps", m["dps"]), ("fp50", m["p50"]), ("fp99", m["p99"]), ("fcpu_us", m["cpu_us"])):
                    results[t.name][k] = [v]
                if t is secure:  # the same burst through POST /api/publish
                    m = measure_fanout(t, ca, args.subscribers, messages=20 if args.quick else 50, api_key=secure.api_key)
                    results[t.name]["api_dps"] = [m["dps"]]
        if "history" not in skip:
            history = measure_history(folder, ca, secure, seconds, rounds)
        if "channels" not in skip:
            channels = measure_channels(folder, ca, secure, seconds, rounds)
        if "streams" not in skip:
            cancels = measure_cancels(secure, ca)
        if "peers" not in skip and "fanout" not in skip:
            peers, peer_notes = make_peers(folder)
            for peer in peers:
                try:
                    peer.start(folder)
                    fanned = measure_fanout(peer, ca, args.subscribers, messages=20 if args.quick else 50, gap=args.fanout_gap)
                    peer_rows.append((peer.name, fanned["cpu_us"]))
                finally:
                    peer.stop()
    finally:
        bare.stop()
        secure.stop()

    b, s = results["bare"], results["secure_ws"]
    print(f"\nmode: {args.mode}; secure_ws storage {args.storage}, {args.workers} worker(s); "
          f"rounds: {rounds} × {seconds:.0f} s; machine: {os.cpu_count()} cores; medians\n")
    print(f"{'measure':<28} {'bare':>12} {'secure_ws':>12} {'unit':<8} {'ratio':>8}")
    rows = [
        ("frame throughput", "fps", "frames/s"),
        ("frame latency p50", "p50", "ms"),
        ("frame latency p99", "p99", "ms"),
        ("server CPU per frame", "cpu_us", "µs"),
        ("handshakes", "hps", "per s"),
        ("idle memory per connection", "kib", "KiB"),
        ("fan-out deliveries", "dps", "per s"),
        ("fan-out latency p50", "fp50", "ms"),
        ("fan-out latency p99", "fp99", "ms"),
        ("server CPU per delivery", "fcpu_us", "µs"),
    ]
    for label, key, unit in rows:
        if key in b and key in s:
            print(ratio_line(label, s[key], b[key], unit))
    if "handler_cpu_us" in s:
        handler, echo = statistics.median(s["handler_cpu_us"]), statistics.median(s["cpu_us"])
        print(f"{'handler round trips':<28} {'':>12} {statistics.median(s['handler_fps']):>12.1f} {'per s':<8}")
        print(f"{'server CPU per handler call':<28} {'':>12} {handler:>12.1f} {'µs':<8} {handler / echo:>7.2f}× secure_ws's echo")
    if "inproc_us" in s:
        inproc, tls = statistics.median(s["inproc_us"]), statistics.median(s["tls_us"])
        print(f"{'CPU per call, TestServer':<28} {tls:>12.1f} {inproc:>12.1f} {'µs':<8} {inproc / tls:>7.2f}× over TLS (TLS | in process)")
    if "chunk_cpu_us" in s:
        chunk, handler = statistics.median(s["chunk_cpu_us"]), statistics.median(s["handler_cpu_us"])
        print(f"{'streamed chunks':<28} {'':>12} {statistics.median(s['chunk_cps']):>12.1f} {'per s':<8}")
        print(f"{'server CPU per chunk':<28} {'':>12} {chunk:>12.2f} {'µs':<8} {chunk / handler:>7.2f}× a handler call's round trip")
    if cancels:
        print(f"{'cancel → cancelled, p50':<28} {'':>12} {cancels['p50_ms']:>12.2f} {'ms':<8} (max {cancels['max_ms']:.2f} ms, "
              f"{CANCELS} cancels; the generator's finally ran before)")
    if "api_dps" in s:
        api, client = statistics.median(s["api_dps"]), statistics.median(s["dps"])
        print(f"{'fan-out via POST /api/publish':<28} {'':>12} {api:>12.1f} {'per s':<8} {api / client:>7.2f}× a client's publish")
    if history:
        on, off = history["publish_on_us"], history["publish_off_us"]
        print(f"{'CPU per publish, history':<28} {off:>12.1f} {on:>12.1f} {'µs':<8} {on / off:>7.2f}× history off (off | on)")
        print(f"{'recover 100 missed messages':<28} {'':>12} {history['cpu_ms']:>12.2f} {'ms CPU':<8} "
              f"(wall {history['wall_ms']:.2f} ms, client included)")
    if peer_rows:
        ours = statistics.median(s["fcpu_us"])
        print(f"\nfan-out, server CPU per delivery ({args.subscribers} subscribers, one process each, TLS):")
        print(f"  {'secure_ws':<12} {ours:>8.1f} µs")
        for name, cpu_us in peer_rows:
            print(f"  {name:<12} {cpu_us:>8.1f} µs    secure_ws / {name} = {ours / cpu_us:.2f}×")
    for note in peer_notes:
        print(f"  (not measured: {note})")
    if channels:
        for kind in ("subscribe", "publish"):
            plain, patterned = channels[f"{kind}_plain_us"], channels[f"{kind}_patterns_us"]
            label = f"CPU per {kind}, 50 rules"
            print(f"{label:<28} {plain:>12.1f} {patterned:>12.1f} {'µs':<8} {patterned / plain:>7.2f}× no rules (none | 50)")
        plain, hooked = channels["subscribe_plain_us"], channels["subscribe_hook_us"]
        print(f"{'CPU per subscribe, hook':<28} {plain:>12.1f} {hooked:>12.1f} {'µs':<8} {hooked / plain:>7.2f}× no hook (none | hook)")
    print("\nratio = secure_ws / bare (higher is better for rates, lower for latency, memory and CPU)")
    for note in cpu_notes:
        print("  " + note)


if __name__ == "__main__":
    mp.set_start_method("fork")
    main()
