#!/usr/bin/env python3
"""Memory attacks against a live secure_ws, and how much each grows the server.

    python scripts/stress.py [--mode uvicorn|serve|both] [--mib N]

For each attack a fresh server is started on loopback (``uvicorn secure_ws.main:app``
and/or ``secure-ws serve``, real TLS, a dev key in a temporary folder), one
attacking connection sends at most ``--mib`` MiB (default 64), and the script
prints what the server answered, its peak RSS growth during the attack
(``VmHWM`` minus the RSS before it) and its RSS growth once the connection has
closed. Every loop is bounded in bytes and seconds; nothing leaves 127.0.0.1.

Attacks (the tests in ``tests/test_hostile.py`` run the same functions):

  head-flood      a request head that never ends: 8 KiB header lines, no blank line
  ping-flood      an authenticated client sends pings and never reads the pongs
  ping-unauthed   the same without a token: the server has already closed 1008
  fragment-flood  FIN=0, then empty continuation frames forever

Read-nothing attacks: a client asks for replies and never reads one, until the
replies it asked for add up to ``--mib`` MiB or the server stops reading its
requests (it is then left stalled for a few seconds, then reads everything it was sent):

  history         100 publications of ~60 KB on a channel, then ``history`` requests (~6 MB answers)
  echo            ``echo`` requests of ~60 KB
  proxy-results   a type the RPC proxy answers with ~1 MiB (a loopback backend the script runs)
  presence        ``presence`` of a channel 100 other connections are subscribed to
  stream-unread   an authenticated client asks for a 1 GiB stream and never reads it: the generator must
                  pause, and another client of the same worker keeps its ping round trip (its p50, loaded
                  against idle, is printed in the answer)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import json
import ssl
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import client_frame, client_ssl, make_targets, ws_open, ws_read  # noqa: E402  (scripts/bench.py)

MIB = 1 << 20
# What a single attack may take before it gives up waiting for the server's answer.
ANSWER_TIMEOUT = 15.0
PING = client_frame(b"p" * 125, 9)  # the largest control frame


async def _open_tls(port: int, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")


async def read_frames(reader: asyncio.StreamReader, timeout: float = ANSWER_TIMEOUT, replies: int | None = None) -> list[tuple[int, bytes]]:
    """Every frame the server sends until it closes the connection (or ``timeout`` passes, or ``replies``
    text messages are in); a fragmented message counts once, as its first frame. Payloads are kept up to
    125 bytes (a close frame's), so reading what a read-nothing attacker asked for costs little."""
    frames: list[tuple[int, bytes]] = []

    async def go() -> None:
        texts = 0
        while True:
            try:
                b0, b1 = await reader.readexactly(2)
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                return
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await reader.readexactly(8))
            frames.append((b0 & 0x0F, (await reader.readexactly(n))[:125] if n else b""))
            texts += b0 & 0x0F == 1
            if replies is not None and texts >= replies and b0 & 0x80:
                return

    with contextlib.suppress(asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        await asyncio.wait_for(go(), timeout)
    return frames


def close_code(frames: list[tuple[int, bytes]]) -> int | None:
    for opcode, payload in frames:
        if opcode == 8:
            return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
    return None


async def _send(writer: asyncio.StreamWriter, chunk: bytes, total: int, stop: Callable[[], bool]) -> int:
    """Write ``chunk`` until ``total`` bytes are out, ``stop()`` says so, or the server hangs up."""
    sent = 0
    try:
        while sent < total and not stop():
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), ANSWER_TIMEOUT)
            sent += len(chunk)
    except (TimeoutError, ConnectionError, ssl.SSLError):
        pass
    return sent


async def _finish(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 5)


# -- the attacks ------------------------------------------------------------------------------------


async def head_flood(port: int, ctx: ssl.SSLContext, token: str, total: int = 64 * MIB) -> dict[str, Any]:
    """``GET /ws`` and then 8 KiB header lines, never the blank line that ends the head."""
    reader, writer = await _open_tls(port, ctx)
    answer = asyncio.ensure_future(reader.read())
    writer.write(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n")
    line = b"X-Pad: " + b"a" * 8183 + b"\r\n"
    sent = await _send(writer, line * 16, total, answer.done)
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError, ssl.SSLError):
        await asyncio.wait_for(asyncio.shield(answer), ANSWER_TIMEOUT)
    reply = answer.result() if answer.done() and not answer.exception() else b""
    if not answer.done():
        answer.cancel()
    await _finish(writer)
    return {"sent": sent, "answer": reply.split(b"\r\n", 1)[0].decode(errors="replace") or "(reset)"}


async def ping_flood(port: int, ctx: ssl.SSLContext, token: str | None, total: int = 64 * MIB) -> dict[str, Any]:
    """Pings as fast as the server takes them, never reading a pong; then a close and everything the
    server sent, to count the pongs it wrote after its own close frame."""
    headers = f"Authorization: Bearer {token}\r\n" if token else ""
    reader, writer = await ws_open(port, ctx, "/ws", headers)
    sent = await _send(writer, PING * 8000, total, lambda: False)
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        writer.write(client_frame(b"\x03\xe8", 8))
    frames = await read_frames(reader)
    await _finish(writer)
    closed_at = next((i for i, (op, _) in enumerate(frames) if op == 8), len(frames))
    return {
        "sent": sent,
        "answer": f"close {close_code(frames)}",
        "pongs": sum(op == 10 for op, _ in frames),
        "pongs_after_close": sum(op == 10 for op, _ in frames[closed_at:]),
    }


async def ping_unauthed(port: int, ctx: ssl.SSLContext, token: str, total: int = 64 * MIB) -> dict[str, Any]:
    return await ping_flood(port, ctx, None, total)


async def fragment_flood(port: int, ctx: ssl.SSLContext, token: str, total: int = 64 * MIB) -> dict[str, Any]:
    """A text message that never ends: FIN=0, then empty continuation frames (6 bytes each)."""
    reader, writer = await ws_open(port, ctx, "/ws", f"Authorization: Bearer {token}\r\n")
    answer = asyncio.ensure_future(read_frames(reader, timeout=60))
    writer.write(client_frame(b"{", 1, fin=False))
    sent = await _send(writer, client_frame(b"", 0, fin=False) * 20000, total, answer.done)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(answer), ANSWER_TIMEOUT)
    frames = answer.result() if answer.done() else []
    answer.cancel()
    await _finish(writer)
    return {"sent": sent, "answer": f"close {close_code(frames)}"}


# -- read-nothing attacks ---------------------------------------------------------------------------

# How long a read-nothing attacker waits on a write before it counts the server as no longer reading it.
STALL = 3.0
LARGE = "x" * 60_000  # under the default 64 KiB message limit with the JSON around it
PROXY_TYPE = "stress.large"
PROXY_RESULT_BYTES = (1 << 20) - 64  # just under the proxy's 1 MiB response bound


async def _ask_unread(
    port: int, ctx: ssl.SSLContext, token: str, request: bytes, reply_bytes: int, total: int,
    setup: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] | None = None,
    batch: int = 32, pace: float = 0.0,
) -> dict[str, Any]:
    """Send ``request`` until the replies asked for add up to ``total`` bytes or the server stops reading
    (a write stalls ``STALL`` seconds), reading nothing; then read until every reply or a close is in.
    ``batch`` requests go per write, ``pace`` seconds apart (calls: no more at once than the server runs)."""
    reader, writer = await ws_open(port, ctx, "/ws", f"Authorization: Bearer {token}\r\n")
    await ws_read(reader, writer)  # the welcome
    if setup is not None:
        await setup(reader, writer)
    wanted = max(1, total // reply_bytes)
    frame = client_frame(request)
    sent, stalled = 0, False
    try:
        while sent < wanted:
            count = min(batch, wanted - sent)
            writer.write(frame * count)
            await asyncio.wait_for(writer.drain(), STALL)
            sent += count
            if pace:
                await asyncio.sleep(pace)
    except TimeoutError:
        stalled = True
    except (ConnectionError, ssl.SSLError):
        pass
    frames = await read_frames(reader, timeout=2 * ANSWER_TIMEOUT, replies=sent)
    await _finish(writer)
    code = close_code(frames)
    answered = sum(op == 1 for op, _ in frames)
    answer = f"close {code}" if code is not None else f"{answered} of {sent} answered"
    return {"sent": sent * len(frame), "answer": answer + (", reading paused" if stalled else ""), "replies": answered}


async def _publish_large(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    for i in range(100):
        writer.write(client_frame(json.dumps({"type": "publish", "channel": "bench", "data": LARGE, "id": i}).encode()))
    for _ in range(100):
        await ws_read(reader, writer)


async def history_unread(port: int, ctx: ssl.SSLContext, token: str, total: int = 64 * MIB) -> dict[str, Any]:
    return await _ask_unread(port, ctx, token, b'{"type":"history","channel":"bench"}', 100 * len(LARGE), total,
                             _publish_large)


async def echo_unread(port: int, ctx: ssl.SSLContext, token: str, total: int = 64 * MIB) -> dict[str, Any]:
    request = json.dumps({"type": "echo", "data": LARGE}).encode()
    return await _ask_unread(port, ctx, token, request, len(request), total)


async def proxy_unread(port: int, ctx: ssl.SSLContext, token: str, total: int = 64 * MIB) -> dict[str, Any]:
    """Needs a server whose ``SECURE_WS_RPC_PROXY_URL`` is :func:`rpc_backend`'s."""
    request = json.dumps({"type": PROXY_TYPE, "id": 1, "data": None}).encode()
    # SECURE_WS_MAX_INFLIGHT (8) calls at a time, each answered by the loopback backend in a few milliseconds.
    return await _ask_unread(port, ctx, token, request, PROXY_RESULT_BYTES, total, batch=8, pace=0.1)


async def presence_unread(port: int, ctx: ssl.SSLContext, token: str, total: int = 64 * MIB) -> dict[str, Any]:
    listeners = []
    try:
        for _ in range(100):
            reader, writer = await ws_open(port, ctx, "/ws", f"Authorization: Bearer {token}\r\n")
            await ws_read(reader, writer)
            writer.write(client_frame(b'{"type":"subscribe","channel":"bench"}'))
            await ws_read(reader, writer)
            listeners.append(writer)
        return await _ask_unread(port, ctx, token, b'{"type":"presence","channel":"bench"}', 100 * 40, total)
    finally:
        for writer in listeners:
            await _finish(writer)


class _Backend(http.server.BaseHTTPRequestHandler):
    body = json.dumps({"data": "y" * (PROXY_RESULT_BYTES - 20)}).encode()

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


PROXY_SECRET = "stress-" + "s" * 40


@contextlib.contextmanager
def rpc_backend() -> Iterator[dict[str, str]]:
    """A loopback RPC backend answering every call with ~1 MiB; yields the server variables that name it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"SECURE_WS_RPC_PROXY_URL": f"http://127.0.0.1:{server.server_address[1]}/rpc",
               "SECURE_WS_RPC_PROXY_SECRET": PROXY_SECRET}
    finally:
        server.shutdown()
        server.server_close()


STREAM_OFFERED = 1 << 30  # what stream-unread asks for, whatever --mib (the attacker itself sends one frame)
STREAM_CHUNK = 16384


async def stream_unread(port: int, ctx: ssl.SSLContext, token: str, total: int = 64 * MIB) -> dict[str, Any]:
    """Ask for a 1 GiB stream (``bench.stream`` of scripts/bench_app.py) and never read it. Meanwhile another
    client of the same worker measures its ping round trip, idle and then once the stream is paused; the
    generator's progress is read from ``bench.produced`` until it stops moving (for 1 s)."""
    other_r, other_w = await ws_open(port, ctx, "/ws", f"Authorization: Bearer {token}\r\n")
    await ws_read(other_r, other_w)

    async def ask(frame: bytes) -> bytes:
        other_w.write(client_frame(frame))
        return await asyncio.wait_for(ws_read(other_r, other_w), ANSWER_TIMEOUT)

    async def ping_p50() -> float:
        took = []
        for _ in range(500):
            started = time.perf_counter()
            await ask(b'{"type":"ping"}')
            took.append(time.perf_counter() - started)
        return sorted(took)[len(took) // 2] * 1e3

    async def produced() -> int:
        return int(json.loads(await ask(b'{"type":"bench.produced","id":"p"}'))["data"])

    idle = await ping_p50()
    reader, writer = await ws_open(port, ctx, "/ws", f"Authorization: Bearer {token}\r\n")
    await ws_read(reader, writer)  # the welcome; nothing more is ever read on this connection
    start = await produced()
    request = client_frame(b'{"type":"bench.stream","id":1,"data":{"n":%d,"size":%d}}' % (STREAM_OFFERED // STREAM_CHUNK, STREAM_CHUNK))
    writer.write(request)
    seen = [start]
    deadline = time.monotonic() + ANSWER_TIMEOUT * 2
    while time.monotonic() < deadline and (len(seen) < 5 or seen[-5] != seen[-1]):
        await asyncio.sleep(0.25)
        seen.append(await produced())
    paused = len(seen) >= 5 and seen[-5] == seen[-1]
    loaded = await ping_p50()
    writer.transport.abort()
    await _finish(other_w)
    mib = (seen[-1] - start) * STREAM_CHUNK / MIB
    state = "paused" if paused else "NOT paused"
    return {
        "sent": len(request),
        "answer": f"{state} at {mib:.1f} of 1024 MiB; ping {loaded:.2f} vs {idle:.2f} ms idle ({loaded / idle:.2f}×)",
        "paused": paused, "produced_mib": mib, "ping_ratio": loaded / idle,
    }


ATTACKS: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "head-flood": head_flood,
    "ping-flood": ping_flood,
    "ping-unauthed": ping_unauthed,
    "fragment-flood": fragment_flood,
    "history": history_unread,
    "echo": echo_unread,
    "proxy-results": proxy_unread,
    "presence": presence_unread,
    "stream-unread": stream_unread,
}


# -- measuring -----------------------------------------------------------------------------------


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


async def _settled(port: int, ctx: ssl.SSLContext) -> None:
    """One complete request answered: the server's loop has dealt with the attacker's close."""
    reader, writer = await _open_tls(port, ctx)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    await asyncio.wait_for(reader.read(), ANSWER_TIMEOUT)
    await _finish(writer)


def measure(attack: str, pid: int, port: int, ctx: ssl.SSLContext, token: str, total: int) -> dict[str, Any]:
    """Run one attack against a server process; add its RSS growth, peak and after close, in MiB."""
    async def go() -> dict[str, Any]:
        await _settled(port, ctx)  # warm: the first request's imports and caches are not the attack's
        base = rss_kib(pid)
        started = time.monotonic()
        result = await ATTACKS[attack](port, ctx, token, total)
        result["seconds"] = time.monotonic() - started
        result["peak_growth_mib"] = (rss_kib(pid, "VmHWM") - base) / 1024
        await _settled(port, ctx)
        result["after_close_growth_mib"] = (rss_kib(pid) - base) / 1024
        return result

    return asyncio.run(go())


def _forget(env: dict[str, str], names: dict[str, str]) -> None:
    for name in names:
        env.pop(name, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("uvicorn", "serve", "both"), default="both")
    parser.add_argument("--mib", type=int, default=64, help="most an attack sends, or asks for unread (default 64)")
    parser.add_argument("--attack", choices=sorted(ATTACKS), action="append", help="only these (repeatable)")
    args = parser.parse_args()
    modes = ("uvicorn", "serve") if args.mode == "both" else (args.mode,)
    print(f"{'entry point':<9} {'attack':<15} {'sent MiB':>9} {'answer':<48} {'peak +MiB':>9} {'closed +MiB':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            folder = Path(tmp) / mode  # a deployment folder of its own per entry point (its own API key file)
            _, target = make_targets(folder, mode)
            for attack in args.attack or ATTACKS:
                with contextlib.ExitStack() as stack:
                    if attack == "proxy-results":
                        backend = stack.enter_context(rpc_backend())
                        target.env.update(backend)
                        stack.callback(_forget, target.env, backend)
                    target.start(folder)
                    try:
                        ctx = client_ssl(str(folder / "ca.crt"))
                        assert target.proc is not None and target.tokens
                        r = measure(attack, target.proc.pid, target.port, ctx, target.tokens[0], args.mib * MIB)
                    finally:
                        target.stop()
                answer = r["answer"] + (f", {r['pongs_after_close']} pongs after close" if "pongs" in r else "")
                print(f"{mode:<9} {attack:<15} {r['sent'] / MIB:>9.1f} {answer:<48} "
                      f"{r['peak_growth_mib']:>9.1f} {r['after_close_growth_mib']:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
