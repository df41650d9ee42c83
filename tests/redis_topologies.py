"""Real Redis topologies on loopback for the failover tests, started and killed by the test itself:

* :class:`SentinelSet` — one master, one replica, three ``redis-sentinel`` processes watching them
  (``down-after-milliseconds`` 1000, so a killed master is replaced within about three seconds);
* :class:`ClusterSet` — three masters with one replica each (``redis-cli --cluster create``),
  ``cluster-node-timeout`` 1000.

Each node is a foreground process on an ephemeral port (a cluster node also needs port + 10000 for its bus).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
from helpers import RedisProcess, free_port

SERVICE = "mymaster"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install redis-sentinel redis-tools)")
    return path


def _wait(condition, within: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {within}s")


class SentinelSet:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.master = RedisProcess(workdir).start(10.0, "--repl-diskless-sync-delay", "0")
        self.replica = RedisProcess(workdir).start(
            10.0, "--replicaof", "127.0.0.1", str(self.master.port), "--repl-diskless-sync-delay", "0"
        )
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen] = []
        for port in self.sentinel_ports:
            conf = workdir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {workdir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.sentinels.append(subprocess.Popen(
                [_binary("redis-sentinel"), str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            ))
        _wait(lambda: self.replica.client().info("replication")["master_link_status"] == "up", 10, "replica in sync")
        for port in self.sentinel_ports:  # every sentinel knows the replica and the two others
            client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
            _wait(lambda c=client: len(c.sentinel_slaves(SERVICE)) >= 1 and len(c.sentinel_sentinels(SERVICE)) >= 2,
                  20, f"sentinel {port} ready")

    @property
    def url(self) -> str:
        return f"redis+sentinel://{','.join(f'127.0.0.1:{p}' for p in self.sentinel_ports)}/{SERVICE}/0"

    def master_port(self) -> int:
        for port in self.sentinel_ports:
            try:
                _, master = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5).sentinel_get_master_addr_by_name(SERVICE)
                return int(master)
            except (redis.RedisError, TypeError):
                continue
        raise AssertionError("no sentinel answers")

    def kill_master(self) -> float:
        """Kill the master like a crash; returns once the sentinels name the replica instead: the failover time."""
        started = time.monotonic()
        old = self.master.port
        self.master.kill()
        _wait(lambda: self.master_port() != old, 30, "sentinel failover")
        self.master, self.replica = self.replica, self.master
        return time.monotonic() - started

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.kill()
            proc.wait(10)
        self.master.kill()
        self.replica.kill()


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no port pair free for a cluster node")


class ClusterSet:
    def __init__(self, workdir: Path) -> None:
        _binary("redis-cli")
        self.nodes: list[RedisProcess] = []
        for _ in range(6):
            port = _cluster_port()
            nodedir = workdir / f"cluster-{port}"
            nodedir.mkdir()
            self.nodes.append(RedisProcess(nodedir, port).start(
                10.0, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000",
                "--repl-diskless-sync-delay", "0",
            ))
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-replicas", "1",
             "--cluster-yes"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )
        _wait(self.healthy, 30, "cluster state ok on every node")
        _wait(self._replicas_in_sync, 30, "every replica in sync")

    def _replicas_in_sync(self) -> bool:
        roles = [n.client().info("replication") for n in self.nodes]
        return all(r.get("master_link_status") == "up" for r in roles if r["role"] == "slave")

    def healthy(self) -> bool:
        live = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        return all(n.client().cluster("info")["cluster_state"] == "ok" for n in live)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port)

    def master_of(self, key: str) -> RedisProcess:
        """The node serving ``key``'s slot now."""
        live = next(n for n in self.nodes if n.proc is not None and n.proc.poll() is None)
        slot = live.client().cluster("keyslot", key)
        for start, end, master, *_ in live.client().execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == int(master[1]))
        raise AssertionError(f"no master for {key}")

    def migrate(self, key: str) -> float:
        """Move ``key``'s slot, keys and all, to another master as ``redis-cli --cluster reshard`` does (clients
        meet ASK, then MOVED); returns once every master names the new owner."""
        started = time.monotonic()
        source = self.master_of(key)
        slot = source.client().cluster("keyslot", key)
        masters = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None
                   and n.client().execute_command("ROLE")[0] == b"master"]
        target = next(n for n in masters if n is not source)
        source_id, target_id = (n.client().execute_command("CLUSTER MYID").decode() for n in (source, target))
        target.client().execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        source.client().execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        while keys := source.client().execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            source.client().execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        for node in masters:
            node.client().execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        _wait(lambda: self.master_of(key) is target, 10, "slot ownership agreed")
        return time.monotonic() - started

    def kill(self, node: RedisProcess) -> float:
        """Kill ``node`` like a crash; returns once the cluster is whole again without it: the failover time."""
        started = time.monotonic()
        node.kill()

        def replaced() -> bool:
            live = next(n for n in self.nodes if n.proc is not None and n.proc.poll() is None)
            masters = {int(m[1]) for _, _, m, *_ in live.client().execute_command("CLUSTER SLOTS")}
            return node.port not in masters and self.healthy()

        _wait(replaced, 30, "cluster failover")
        return time.monotonic() - started

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
