#!/usr/bin/env python3
"""Soak: many clients for a long time against a real server on Redis, optionally through Redis failovers.

    python scripts/soak.py [--clients N] [--seconds S] [--workers W] [--failover-every S] [--json]

Starts everything itself on loopback: a key directory, Redis (one server, or with ``--failover-every``
a Sentinel set: master, replica, three sentinels), and ``uvicorn bench_app:app --workers W`` over TLS
(the built-in service plus one Python handler, ``bench.echo``). Then N clients, each on its own token and
some of the shared channels, each doing at random: publish (its own numbered data), a handler call, a
refresh of its token, a reconnect (which resubscribes with ``since``), and a ``stream`` call
(``bench.stream``, three chunks). With ``--failover-every``, the Redis master is killed that often and comes back as a replica.

Checked at the end (exit 1 if any fails):
* zero lost, zero duplicated channel messages: every client saw, on every channel, each offset from its first
  subscribe to the channel's last exactly once (across its reconnects), or was told ``recovered:false``;
* every acknowledged publication in history (its data found at its channel);
* the server's RSS (supervisor and workers) flat: after the first fifth (warm-up), every sample within ±10 %
  of the warm-up's last;
* latencies: publish→delivery and request→reply p50/p99 (reported).

The suite runs a 60 s version (tests/test_soak.py). The long one, on a machine of its own:

    python scripts/soak.py --clients 1000 --seconds 600 --workers 2 --failover-every 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]

CHANNELS = [f"soak.{n}" for n in range(8)]
PER_CLIENT = 3  # channels each client holds
RSS_TOLERANCE = 0.10
ACTION_PAUSE = (0.2, 1.0)  # seconds between one client's actions


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_kib(pid: int) -> int:
    """The process's RSS plus its children's (the workers), from /proc."""
    total = 0
    pids = [str(pid), *Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


class Stats:
    def __init__(self) -> None:
        self.delivery: list[float] = []  # publish → delivery, s
        self.rtt: list[float] = []  # request → reply, s
        self.acked: dict[str, list[str]] = {c: [] for c in CHANNELS}
        self.unavailable = 0
        self.actions: dict[str, int] = {}

    def count(self, action: str) -> None:
        self.actions[action] = self.actions.get(action, 0) + 1


class Client:
    def __init__(self, n: int, url: str, ssl_ctx: Any, issue: Any, stats: Stats) -> None:
        self.n, self.url, self.ssl, self.issue, self.stats = n, url, ssl_ctx, issue, stats
        self.channels = random.Random(n).sample(CHANNELS, PER_CLIENT)
        self.first: dict[str, int] = {}  # channel → offset of the first subscribe
        self.position: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, list[int]] = {c: [] for c in self.channels}
        self.told_lost: dict[str, int] = {}
        self.resubscribe: set[str] = set()  # subscribes answered `unavailable` (a failover): sent again
        self.errors: list[str] = []
        self.published = 0

    def token(self) -> str:
        return self.issue(f"soak-{self.n}", 3600, "subscribe:soak.* publish:soak.*")

    async def run(self, quiet: asyncio.Event, stop: asyncio.Event) -> None:
        """Act until ``quiet``, keep reading until ``stop``."""
        self.quiet = quiet
        rng = random.Random(self.n)
        while not stop.is_set():
            try:
                await self._session(rng, stop)
            except (websockets.ConnectionClosed, OSError, TimeoutError, websockets.InvalidStatus) as exc:
                rcvd = getattr(exc, "rcvd", None)
                self.stats.count(f"dropped ({rcvd.code} {rcvd.reason})" if rcvd is not None else f"dropped ({type(exc).__name__})")
                await asyncio.sleep(0.2 + rng.random() * 0.3)

    async def _session(self, rng: random.Random, stop: asyncio.Event) -> None:
        async with websockets.connect(self.url, ssl=self.ssl, additional_headers={"Authorization": f"Bearer {self.token()}"},
                                      open_timeout=10, max_size=None) as ws:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if frame.get("type") != "welcome":
                raise OSError(f"no welcome: {frame}")
            pending: dict[int, tuple[str, float, Any]] = {}
            ids = iter(range(1, 1 << 62))
            for channel in self.channels:
                request: dict[str, Any] = {"type": "subscribe", "channel": channel, "id": next(ids)}
                if channel in self.position:
                    request["since"] = self.position[channel]
                pending[request["id"]] = ("subscribe", time.monotonic(), channel)
                await ws.send(json.dumps(request))
            reader = asyncio.create_task(self._read(ws, pending))
            try:
                until = time.monotonic() + rng.uniform(5, 30)  # then reconnect
                while not stop.is_set() and (time.monotonic() < until or self.quiet.is_set()) and not reader.done():
                    await asyncio.sleep(rng.uniform(*ACTION_PAUSE))
                    for channel in list(self.resubscribe):
                        self.resubscribe.discard(channel)
                        id = next(ids)
                        pending[id] = ("subscribe", time.monotonic(), channel)
                        since = {"since": self.position[channel]} if channel in self.position else {}
                        await ws.send(json.dumps({"type": "subscribe", "channel": channel, "id": id, **since}))
                    if not self.quiet.is_set():
                        await self._act(ws, rng, pending, next(ids))
                self.stats.count("reconnect")
            finally:
                await asyncio.sleep(0.5)  # replies to what was sent
                reader.cancel()

    async def _act(self, ws: Any, rng: random.Random, pending: dict[int, Any], id: int) -> None:
        roll = rng.random()
        if roll < 0.5:
            channel = rng.choice(self.channels)
            data = {"c": self.n, "n": self.published, "t": time.time()}
            self.published += 1
            pending[id] = ("publish", time.monotonic(), (channel, f"{self.n}-{data['n']}"))
            await ws.send(json.dumps({"type": "publish", "channel": channel, "data": data, "id": id}))
        elif roll < 0.8:
            pending[id] = ("handler", time.monotonic(), None)
            await ws.send(json.dumps({"type": "bench.echo", "data": "x" * rng.randint(1, 512), "id": id}))
        elif roll < 0.9:
            pending[id] = ("refresh", time.monotonic(), None)
            await ws.send(json.dumps({"type": "refresh", "token": self.token(), "id": id}))
        else:
            pending[id] = ("stream", time.monotonic(), None)
            await ws.send(json.dumps({"type": "bench.stream", "data": {"n": 3}, "id": id}))

    async def _read(self, ws: Any, pending: dict[int, Any]) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            kind = frame.get("type")
            if kind == "message":
                self._message(frame)
                continue
            entry = pending.pop(frame.get("id"), None) if "id" in frame else None
            if entry is None:
                continue
            action, sent, extra = entry
            self.stats.rtt.append(time.monotonic() - sent)
            self.stats.count(action)
            if kind == "error":
                if frame.get("code") == "unavailable":
                    self.stats.unavailable += 1
                    if action == "subscribe":
                        self.resubscribe.add(extra)
                else:
                    self.errors.append(f"{action}: {frame}")
            elif action == "subscribe":
                channel = extra
                self.first.setdefault(channel, frame["offset"])
                if frame.get("recovered") is False:
                    self.told_lost[channel] = self.told_lost.get(channel, 0) + 1
                    self.seen[channel].append(-1)  # a reset marker: the stream restarts at the new position
                if frame.get("recovered") is not True or channel not in self.position:
                    self.position[channel] = {"offset": frame["offset"], "epoch": frame["epoch"]}
            elif action == "publish":
                self.stats.acked[extra[0]].append(extra[1])

    def _message(self, frame: dict[str, Any]) -> None:
        channel = frame["channel"]
        if channel not in self.seen:
            return
        self.seen[channel].append(frame["offset"])
        self.position[channel] = {"offset": frame["offset"], "epoch": frame["epoch"]}
        data = frame.get("data")
        if isinstance(data, dict) and "t" in data:
            self.stats.delivery.append(time.time() - data["t"])

    def check(self, last: dict[str, int]) -> list[str]:
        problems = list(self.errors[:3])
        for channel, offsets in self.seen.items():
            if channel not in self.first:
                continue
            segments, current = [], [self.first[channel]]
            for offset in offsets:
                if offset == -1:
                    segments.append(current)
                    current = []
                else:
                    current.append(offset)
            segments.append(current)
            for segment in segments:
                if segment and segment != list(range(segment[0], segment[0] + len(segment))):
                    problems.append(f"client {self.n} {channel}: gap or duplicate near {_first_break(segment)}")
            tail = segments[-1]
            if tail and tail[-1] != last[channel]:
                problems.append(f"client {self.n} {channel}: ends at {tail[-1]}, the channel at {last[channel]}")
        return problems


def _first_break(segment: list[int]) -> list[int]:
    for i in range(1, len(segment)):
        if segment[i] != segment[i - 1] + 1:
            return segment[max(0, i - 2) : i + 2]
    return []


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    from keydir import keydir_env, make_keydir

    from secure_ws.auth.signing import issue_token
    from secure_ws.settings import load_settings

    folder = Path(tempfile.mkdtemp(prefix="sws-soak-"))
    make_keydir(folder)
    topology: Any
    if args.failover_every:
        from redis_topologies import SentinelSet

        topology = SentinelSet(folder)
        storage = topology.url
    else:
        from helpers import RedisProcess

        topology = RedisProcess(folder).start()
        storage = topology.url
    env = keydir_env(folder, SECURE_WS_STORAGE_URL=storage, SECURE_WS_RATE_LIMIT="1000/second",
                     SECURE_WS_HANDSHAKE_RATE_LIMIT="1000000/minute", SECURE_WS_HISTORY_SIZE="1000",
                     SECURE_WS_MAX_CONNECTIONS_PER_CLIENT="10", PYTHONPATH=str(ROOT / "scripts"))
    os.environ.update({k: v for k, v in env.items() if k.startswith("SECURE_WS_")})
    settings = load_settings(env_file=None)
    from helpers import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench_app:app", "--host", "127.0.0.1", "--port", str(port),
         "--ssl-keyfile", str(folder / "server.key"), "--ssl-certfile", str(folder / "server.crt"),
         "--workers", str(args.workers), "--log-level", "warning", "--no-access-log"],
        env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "wb"),
    )
    import ssl

    ctx = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    url = f"wss://localhost:{port}/ws"
    stats = Stats()
    clients = [Client(n, url, ctx, lambda s, t, sc: issue_token(s, scope=sc, ttl=t, settings=settings), stats)
               for n in range(args.clients)]
    rss: list[tuple[float, int]] = []
    failovers: list[float] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                async with websockets.connect(url, ssl=ctx, open_timeout=2):
                    break
            except (OSError, websockets.InvalidStatus, websockets.InvalidMessage, TimeoutError):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"server did not start: {(folder / 'server.log').read_text()[-2000:]}") from None
                await asyncio.sleep(0.2)
        quiet, stop = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(c.run(quiet, stop)) for c in clients]
        started = time.monotonic()
        next_failover = started + (args.failover_every or float("inf"))
        while time.monotonic() - started < args.seconds:
            await asyncio.sleep(min(5.0, max(0.1, args.seconds - (time.monotonic() - started))))
            rss.append((time.monotonic() - started, rss_kib(server.pid)))
            if time.monotonic() >= next_failover:
                failovers.append(await asyncio.to_thread(topology.kill_master))
                await asyncio.to_thread(topology.replica.start, 10.0, "--replicaof", "127.0.0.1",
                                        str(topology.master.port), "--repl-diskless-sync-delay", "0")
                next_failover = time.monotonic() + args.failover_every
        quiet.set()  # no more publications; what was published reaches everyone (and failed subscribes retry)
        await asyncio.sleep(5)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Every client is gone: the channels' last offsets, as history has them.
        async with websockets.connect(url, ssl=ctx, additional_headers={
            "Authorization": f"Bearer {issue_token('soak-check', scope='subscribe:soak.*', ttl=600, settings=settings)}"}) as ws:
            await ws.recv()
            last = {}
            history: dict[str, list[Any]] = {}
            for channel in CHANNELS:
                await ws.send(json.dumps({"type": "history", "channel": channel, "limit": 1000}))
                answer = json.loads(await ws.recv())
                last[channel] = answer["offset"]
                history[channel] = [m["data"] for m in answer["messages"]]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        if args.failover_every:
            topology.stop()
        else:
            topology.kill()
    problems = [p for c in clients for p in c.check(last)]
    found = {c: {f"{d['c']}-{d['n']}" for d in msgs if isinstance(d, dict)} for c, msgs in history.items()}
    for channel, acked in stats.acked.items():
        if len(acked) <= 1000:  # all of them still in history
            lost = [a for a in acked if a not in found[channel]]
            if lost:
                problems.append(f"{channel}: {len(lost)} acknowledged publications not in history, e.g. {lost[:3]}")
    warm = [kib for t, kib in rss if t >= args.seconds / 5]
    base = warm[0] if warm else 0
    rss_ok = all(abs(kib - base) <= RSS_TOLERANCE * base for kib in warm) if warm else True
    if not rss_ok:
        problems.append(f"server RSS not flat after warm-up: {warm[0]} KiB → {min(warm)}…{max(warm)} KiB")
    return {
        "clients": args.clients, "seconds": args.seconds, "workers": args.workers,
        "failovers": [round(f, 2) for f in failovers],
        "actions": stats.actions, "unavailable": stats.unavailable,
        "delivered": sum(len(o) for c in clients for o in c.seen.values()),
        "told recovered:false": sum(sum(c.told_lost.values()) for c in clients),
        "delivery p50 ms": round(pct(stats.delivery, 0.5) * 1000, 1), "delivery p99 ms": round(pct(stats.delivery, 0.99) * 1000, 1),
        "reply p50 ms": round(pct(stats.rtt, 0.5) * 1000, 1), "reply p99 ms": round(pct(stats.rtt, 0.99) * 1000, 1),
        "rss KiB (after warm-up)": [min(warm, default=0), max(warm, default=0)],
        "rss mean KiB": round(statistics.mean(k for _, k in rss)) if rss else 0,
        "problems": problems[:20],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--failover-every", type=float, default=0, help="kill the Redis master this often (Sentinel)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    args = parser.parse_args()
    summary = asyncio.run(soak(args))
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>26}: {value}")
    sys.exit(1 if summary["problems"] else 0)


if __name__ == "__main__":
    main()
