"""SPEC §15: hosts behind a real balancer. Three ``secure-ws serve --workers 2`` on one Redis behind Debian's
haproxy, all on loopback, started by the test.

haproxy ends the clients' TLS and opens its own TLS connection to a host (verified against the dev CA),
adding ``X-Forwarded-For``; the hosts trust it (``--forwarded-allow-ips 127.0.0.1``), so the per-IP handshake
throttle counts each client's own address. Clients come from distinct loopback addresses (127.0.0.0/8).

One host is killed (every process of it, SIGKILL) under traffic: its clients reconnect through haproxy to the
others and recover with ``since``: every acknowledged publication reaches every client once, in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import websockets
from failover_scenario import messages_until
from helpers import Serve, Server, base_env, recv_json, run, wait_for, welcome

SCOPE = "subscribe:* publish:*"
THROTTLE = 20  # handshakes per minute per client address, shared by the hosts through Redis


class Balancer(Server):
    """haproxy in front of ``hosts``; Server's client helpers aimed at its port."""

    def __init__(self, keydir: Path, hosts: list[Server]) -> None:
        super().__init__(keydir, {})
        self.hosts = hosts

    def argv(self) -> list[str]:
        binary = shutil.which("haproxy")
        assert binary is not None
        pem = self.keydir / "haproxy.pem"
        pem.write_text((self.keydir / "server.crt").read_text() + (self.keydir / "server.key").read_text())
        servers = "\n".join(
            f"    server h{n} 127.0.0.1:{host.port} ssl verify required ca-file {self.keydir / 'ca.crt'} "
            f"verifyhost localhost sni str(localhost) check inter 300 fall 2 rise 2"
            for n, host in enumerate(self.hosts)
        )
        config = self.keydir / f"haproxy-{self.port}.cfg"
        config.write_text(f"""global
    maxconn 2000
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    retries 3
    option redispatch
frontend clients
    bind 127.0.0.1:{self.port} ssl crt {pem}
    option forwardfor
    default_backend hosts
backend hosts
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
{servers}
""")
        return [binary, "-db", "-f", str(config)]


def _kill_host(host: Server) -> None:
    """SIGKILL the supervisor and its workers: a host lost at once, nothing cleaned up."""
    assert host.proc is not None
    pid = host.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in children:
        os.kill(int(child), signal.SIGKILL)
    host.proc.kill()
    host.proc.wait(10)


class Client:
    """A subscriber through the balancer from its own loopback address; reconnects and recovers by itself."""

    def __init__(self, balancer: Balancer, token: str, address: str) -> None:
        self.balancer, self.token, self.address = balancer, token, address
        self.messages: list[dict[str, Any]] = []
        self.position: dict[str, Any] | None = None
        self.reconnects = 0
        self.recovered: list[bool] = []

    async def run(self, stop: asyncio.Event, ready: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with self.balancer.connect(self.token, local_addr=(self.address, 0)) as ws:
                    await welcome(ws)
                    request: dict[str, Any] = {"type": "subscribe", "channel": "feed"}
                    if self.position is not None:
                        request["since"] = self.position
                    await ws.send(json.dumps(request))
                    reply = await recv_json(ws, 10)
                    assert reply["type"] == "subscribed", reply
                    if self.position is None:
                        self.position = {"offset": reply["offset"], "epoch": reply["epoch"]}
                        ready.set()
                    else:
                        self.recovered.append(reply["recovered"])
                    async for frame in messages_until(ws, stop):
                        self.messages.append(frame)
                        self.position = {"offset": frame["offset"], "epoch": frame["epoch"]}
            except (websockets.ConnectionClosed, OSError, websockets.InvalidStatus, TimeoutError):
                self.reconnects += 1
                await asyncio.sleep(0.2)


async def _publisher(balancer: Balancer, token: str, stop: asyncio.Event, acked: list[int]) -> None:
    n = 0
    while not stop.is_set():
        try:
            async with balancer.connect(token) as ws:
                await welcome(ws)
                while not stop.is_set():
                    await ws.send(json.dumps({"type": "publish", "channel": "feed", "data": n}))
                    reply = await recv_json(ws, 10)
                    if reply.get("type") == "published":
                        acked.append(n)
                    n += 1
                    await asyncio.sleep(0.02)
        except (websockets.ConnectionClosed, OSError, websockets.InvalidStatus, TimeoutError):
            await asyncio.sleep(0.1)


@pytest.fixture
def hosts(keydir, own_redis):
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (Debian: apt-get install haproxy)")
    env = base_env(keydir, SECURE_WS_STORAGE_URL=own_redis().url, SECURE_WS_HANDSHAKE_RATE_LIMIT=f"{THROTTLE}/minute",
                   SECURE_WS_RATE_LIMIT="1000/second")
    started: list[Server] = []
    try:
        for _ in range(3):
            started.append(Serve(keydir, env, ("--workers", "2", "--forwarded-allow-ips", "127.0.0.1")).start())
        yield started
    finally:
        for host in started:
            if host.proc is not None and host.proc.poll() is None:
                host.stop()


@pytest.fixture
def balancer(keydir, hosts):
    lb = Balancer(keydir, hosts).start()
    wait_for(lambda: lb.get("/readyz")[0] == 200, 20, "haproxy forwarding to a ready host")
    yield lb
    lb.stop()


def test_a_host_killed_under_traffic_loses_nothing(balancer, hosts, issue):
    async def go() -> None:
        stop, published = asyncio.Event(), asyncio.Event()
        clients = [Client(balancer, issue(scope=SCOPE), f"127.0.0.{10 + n}") for n in range(6)]
        readies = [asyncio.Event() for _ in clients]
        acked: list[int] = []
        tasks = [asyncio.create_task(c.run(stop, r)) for c, r in zip(clients, readies, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 20)
        publisher = asyncio.create_task(_publisher(balancer, issue(scope=SCOPE), published, acked))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(_kill_host, hosts[0])
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < 3.0:
            await asyncio.sleep(0.1)
        published.set()
        await publisher
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(
            c.messages and c.messages[-1]["data"] == acked[-1] for c in clients
        ):
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*tasks)
        assert sum(c.reconnects for c in clients) >= 1, "no client was on the killed host"
        for c in clients:
            offsets = [m["offset"] for m in c.messages]
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), f"{c.address}: gap or duplicate"
            got = [m["data"] for m in c.messages]
            assert [d for d in acked if d not in got] == [], f"{c.address}: acknowledged publications lost"
            assert all(c.recovered), f"{c.address}: recovery refused after the host died: {c.recovered}"
        print(f"\nhost killed: {len(acked)} publications, {sum(c.reconnects for c in clients)} reconnections, none lost")

    run(go())


def test_the_per_ip_throttle_sees_each_client_through_the_balancer(balancer, issue):
    async def outcome(address: str) -> str:
        try:
            async with balancer.connect(issue(scope=SCOPE), local_addr=(address, 0)) as ws:
                await welcome(ws)
                return "welcome"
        except websockets.InvalidStatus as exc:
            return str(exc.response.status_code)

    async def go() -> None:
        first = [await outcome("127.0.0.2") for _ in range(THROTTLE + 1)]
        assert first[:THROTTLE] == ["welcome"] * THROTTLE and first[THROTTLE] == "429", first
        assert await outcome("127.0.0.3") == "welcome", "another client address was throttled with the first"

    run(go())

