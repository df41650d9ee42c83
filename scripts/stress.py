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
  stream-unread   an authenticated client asks for a 1 GiB stream and never reads it: the generator must
                  pause, and another client of the same worker keeps its ping round trip (its p50, loaded
                  against idle, is printed in the answer)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
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


async def read_frames(reader: asyncio.StreamReader, timeout: float = ANSWER_TIMEOUT) -> list[tuple[int, bytes]]:
    """Every frame the server sends until it closes the connection (or ``timeout`` passes)."""
    frames: list[tuple[int, bytes]] = []

    async def go() -> None:
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
            frames.append((b0 & 0x0F, await reader.readexactly(n) if n else b""))

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("uvicorn", "serve", "both"), default="both")
    parser.add_argument("--mib", type=int, default=64, help="most an attack sends (default 64)")
    parser.add_argument("--attack", choices=sorted(ATTACKS), action="append", help="only these (repeatable)")
    args = parser.parse_args()
    modes = ("uvicorn", "serve") if args.mode == "both" else (args.mode,)
    print(f"{'entry point':<9} {'attack':<15} {'sent MiB':>9} {'answer':<48} {'peak +MiB':>9} {'closed +MiB':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            folder = Path(tmp) / mode  # a deployment folder of its own per entry point (its own API key file)
            _, target = make_targets(folder, mode)
            for attack in args.attack or ATTACKS:
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
