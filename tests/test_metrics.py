"""/metrics with several workers: one scrape on any worker gives the totals of all of them (SPEC §8, §12).

Real processes: ``secure-ws serve --workers 2`` and plain ``uvicorn secure_ws.main:app --workers 2`` over
TLS, with a throw-away Redis. Which worker holds a connection is read from /proc (the server side of the
client's TCP connection, by socket inode), so the tests know the connections are spread over both workers
instead of hoping so.
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Samples, Serve, Server, base_env, closed_with, metric, request, run, scrape, wait_for, welcome

import secure_ws

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the workers' sockets from Linux /proc")

WORKERS = 2


def workers_of(server: Server) -> set[int]:
    """The worker processes of a multi-worker server: its multiprocessing children (not the resource tracker)."""
    assert server.proc is not None
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        if ppid == server.proc.pid and b"spawn_main" in cmdline:
            found.add(int(entry))
    return found


def all_workers(server: Server) -> set[int]:
    def found() -> set[int] | None:
        pids = workers_of(server)
        return pids if len(pids) == WORKERS else None

    return wait_for(found, 20, f"{WORKERS} workers")


def scrape_until(server: Server, condition: Callable[[Samples], bool], what: str, within: float = 20.0) -> Samples:
    def check() -> Samples | None:
        samples = scrape(server)
        return samples if condition(samples) else None

    return wait_for(check, within, what)


def _server_socket_inode(server_port: int, client_port: int) -> int | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1].rsplit(":", 1)[1], fields[2].rsplit(":", 1)[1]
            if int(local, 16) == server_port and int(remote, 16) == client_port:
                return int(fields[9])
    return None


def holder(server: Server, ws, pids: set[int]) -> int:
    """The worker that holds this client connection."""
    inode = _server_socket_inode(server.port, ws.local_address[1])
    assert inode, "server side of the connection not found in /proc/net/tcp"
    target = f"socket:[{inode}]"
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        for fd in os.listdir(fds):
            try:
                if os.readlink(fds / fd) == target:
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no worker of {pids} holds {target}")


def start_multi(kind: str, keydir: Path, redis_url: str, **env: str) -> Server:
    environment = base_env(keydir, SECURE_WS_STORAGE_URL=redis_url, **env)
    if kind == "serve":
        return Serve(keydir, environment, ("--workers", str(WORKERS))).start()
    return Server(keydir, environment, ("--workers", str(WORKERS))).start()


async def spread(server: Server, issue, pids: set[int], per_worker: int, limit: int = 60) -> list[tuple[object, int]]:
    """Open connections until every worker holds at least ``per_worker``: [(ws, worker pid)]."""
    async def one() -> object:
        ws = await server.connect(issue())
        await welcome(ws)
        return ws

    opened: list[tuple[object, int]] = []
    held = dict.fromkeys(pids, 0)
    while min(held.values()) < per_worker:
        assert len(opened) < limit, f"{limit} connections never reached every worker: {held}"
        for ws in await asyncio.gather(one(), one()):  # two at once: both workers race to accept
            pid = holder(server, ws, pids)
            held[pid] += 1
            opened.append((ws, pid))
    return opened


def steady(server: Server, want: Samples, within: float = 15.0) -> None:
    """Every worker flushes within a second: wait until a scrape shows ``want``, then check that five
    more scrapes (each a new connection, answered by whichever worker accepts it) all agree."""
    def matches() -> bool:
        samples = scrape(server)
        return all(samples.get(key, 0.0) == value for key, value in want.items())

    wait_for(matches, within, f"a scrape showing {want}")
    for _ in range(5):
        samples = scrape(server)
        assert {key: samples.get(key, 0.0) for key in want} == want


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


@pytest.mark.parametrize("kind", ["serve", "uvicorn"])
def test_one_scrape_holds_every_workers_counts(kind, keydir, issue, own_redis, tmp_path):
    redis = own_redis()
    # Its own temp dir: the run's metrics directory is made there, and (serve) removed from there at exit.
    server = start_multi(kind, keydir, redis.url, TMPDIR=str(tmp_path))
    try:
        pids = all_workers(server)

        async def go():
            opened = await spread(server, issue, pids, per_worker=2)
            try:
                sent = 0
                for index, (ws, _) in enumerate(opened):
                    for i in range(index % 3 + 1):
                        assert (await request(ws, {"type": "ping", "id": i}))["type"] == "pong"
                        sent += 1
                steady(server, {
                    key("secure_ws_connections_active"): len(opened),
                    key("secure_ws_messages_total"): sent,
                    key("secure_ws_handshakes_total", result="accepted"): len(opened),
                })
                # A close with its code and reason, on every worker: counted once each, summed in any scrape.
                for ws, _ in opened:
                    await ws.send(b"\x00")
                    assert await closed_with(ws) == (1003, "binary frames are not accepted")
                steady(server, {
                    key("secure_ws_connections_active"): 0,
                    key("secure_ws_closes_total", code="1003", reason="binary_frames_are_not_accepted"): len(opened),
                })
            finally:
                for ws, _ in opened:
                    await ws.close()

        run(go())
        samples = scrape(server)
        # Process metrics for each worker, labelled by pid; build_info once.
        for pid in pids:
            assert metric(samples, "process_cpu_seconds_total", pid=str(pid)) > 0
            assert metric(samples, "process_resident_memory_bytes", pid=str(pid)) > 0
        assert metric(samples, "secure_ws_build_info", version=secure_ws.__version__, python=platform.python_version()) == 1
        assert metric(samples, "secure_ws_storage_up") == 1
    finally:
        server.stop()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("secure-ws-metrics")]
    if kind == "serve":
        assert leftovers == [], "secure-ws serve leaves its metrics directory behind"


def test_killed_worker_leaves_the_gauges_and_keeps_the_counts(keydir, issue, own_redis, tmp_path):
    """A worker killed outright never says goodbye: its connections leave connections_active at the next
    scrape, its counted messages stay in the totals, and uvicorn's replacement worker joins the sums."""
    redis = own_redis()
    server = start_multi("uvicorn", keydir, redis.url, TMPDIR=str(tmp_path))
    try:
        pids = all_workers(server)

        async def go():
            opened = await spread(server, issue, pids, per_worker=1)
            for ws, _ in opened:
                assert (await request(ws, {"type": "ping"}))["type"] == "pong"
            steady(server, {key("secure_ws_messages_total"): len(opened), key("secure_ws_connections_active"): len(opened)})
            victim = opened[0][1]
            survivors = [ws for ws, pid in opened if pid != victim]
            os.kill(victim, signal.SIGKILL)
            steady(server, {key("secure_ws_messages_total"): len(opened), key("secure_ws_connections_active"): len(survivors)})
            samples = scrape(server)
            assert not any(name == "process_cpu_seconds_total" and ("pid", str(victim)) in labels for name, labels in samples)
            for ws, _ in opened:
                await ws.close()

        run(go())
        # The supervisor replaces the killed worker; the replacement's process metrics join the scrape.
        wait_for(lambda: len(workers_of(server)) == WORKERS, 20, "a replacement worker")
    finally:
        server.stop()


def test_uvicorn_workers_sweep_directories_of_ended_servers(keydir, own_redis, tmp_path):
    """Plain `uvicorn --workers`: nothing of ours runs in uvicorn's supervisor, so each run's directory is
    named after the supervisor, and the next start removes those of supervisors no longer running."""
    root = tmp_path / f"secure-ws-metrics-{os.getuid()}"
    root.mkdir(mode=0o700)
    stale = root / "999999999-12345"  # beyond any pid_max: a supervisor that has ended
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"")
    server = start_multi("uvicorn", keydir, own_redis().url, TMPDIR=str(tmp_path))
    try:
        wait_for(lambda: not stale.exists(), 20, "the ended server's directory to be swept")
        assert server.proc is not None
        ours = [p for p in root.iterdir() if p.name.startswith(f"{server.proc.pid}-")]
        assert len(ours) == 1 and (ours[0].stat().st_mode & 0o777) == 0o700
        wait_for(lambda: any(ours[0].glob("counter_*.db")), 20, "the workers' metric files")
    finally:
        server.stop()


def test_single_process_metrics(server, issue):
    """One process (no workers): the standard process metrics without a pid label, the new families present."""
    async def go():
        async with server.connect(issue(scope="subscribe:metrics-test publish:metrics-test")) as ws:
            await welcome(ws)
            assert (await request(ws, {"type": "subscribe", "channel": "metrics-test"}))["type"] == "subscribed"
            assert (await request(ws, {"type": "publish", "channel": "metrics-test", "data": 1}))["type"] == "published"

    before = scrape(server)
    run(go())
    after = scrape(server)
    assert metric(after, "process_cpu_seconds_total") > 0
    assert metric(after, "process_open_fds") > 0
    assert metric(after, "secure_ws_build_info", version=secure_ws.__version__, python=platform.python_version()) == 1
    assert metric(after, "secure_ws_publishes_total") - metric(before, "secure_ws_publishes_total") == 1
    assert metric(after, "secure_ws_deliveries_total") - metric(before, "secure_ws_deliveries_total") == 1
    body = server.get("/metrics")[2].decode()
    for family in ("secure_ws_storage_up", "secure_ws_keyring_keys", "secure_ws_revocations_checked_timestamp_seconds",
                   "secure_ws_keyring_reloads", "secure_ws_storage_seconds", "secure_ws_storage_errors"):
        assert f"# TYPE {family} " in body or f"# TYPE {family}_total " in body, family


def test_storage_latency_errors_and_revocation_check(keydir, issue, own_redis):
    """With Redis: storage calls are timed by operation; a Redis that stops answering shows as storage_up 0,
    failed calls by operation, and a revocation-check timestamp that stops advancing."""
    redis = own_redis()
    server = Server(keydir, base_env(keydir, SECURE_WS_STORAGE_URL=redis.url)).start()
    try:
        async def go():
            async with server.connect(issue()) as ws:
                await welcome(ws)
                assert (await request(ws, {"type": "ping"}))["type"] == "pong"

        run(go())
        samples = scrape_until(server, lambda s: metric(s, "secure_ws_storage_seconds_count", op="rate_limit") > 0, "timed rate-limit calls")
        assert metric(samples, "secure_ws_storage_seconds_count", op="connection_slot") >= 1
        assert metric(samples, "secure_ws_storage_up") == 1
        checked = metric(samples, "secure_ws_revocations_checked_timestamp_seconds")
        assert checked > 0
        wait_for(lambda: metric(scrape(server), "secure_ws_revocations_checked_timestamp_seconds") > checked, 20,
                 "the revocation check to advance")

        killed_at = time.time()
        redis.kill()

        async def refused():
            async with server.connect(issue()) as ws:
                return await closed_with(ws)

        assert run(refused()) == (1013, "service unavailable")
        samples = scrape_until(server, lambda s: metric(s, "secure_ws_storage_up") == 0, "storage_up 0")
        assert sum(v for (name, _), v in samples.items() if name == "secure_ws_storage_errors_total") >= 1
        # Nothing confirmed since Redis went away: an alert on time() minus this fires.
        assert 0 < metric(samples, "secure_ws_revocations_checked_timestamp_seconds") <= killed_at
    finally:
        server.stop()

