"""SPEC §15 on real Redis topologies started by the test on loopback: a master killed under traffic.

Sentinel: one master, one replica, three sentinels; two server processes on ``redis+sentinel://``. Cluster:
three masters and three replicas; two server processes on ``redis+cluster://``, channels spread over the
masters. See :mod:`failover_scenario` for what is checked through the failover.
"""

from __future__ import annotations

import jwt
import pytest
from failover_scenario import SCOPE, failover_under_traffic
from helpers import Server, base_env, cli, run
from redis_topologies import ClusterSet, SentinelSet

ENV = {"SECURE_WS_RATE_LIMIT": "1000/second", "SECURE_WS_HISTORY_SIZE": "5000"}


@pytest.fixture
def sentinel_set(tmp_path):
    topology = SentinelSet(tmp_path)
    yield topology
    topology.stop()


@pytest.fixture
def cluster_set(tmp_path):
    topology = ClusterSet(tmp_path)
    yield topology
    topology.stop()


def _servers(keydir, url: str, count: int = 2) -> list[Server]:
    return [Server(keydir, base_env(keydir, SECURE_WS_STORAGE_URL=url, **ENV)).start() for _ in range(count)]


def _revoked(keydir, issue, url: str) -> str:
    token = issue(scope=SCOPE)
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    cli(keydir, "token", "revoke", "--jti", jti, env=base_env(keydir, SECURE_WS_STORAGE_URL=url))
    return token


def test_sentinel_failover_under_traffic(keydir, issue, sentinel_set):
    servers = _servers(keydir, sentinel_set.url)
    try:
        revoked = _revoked(keydir, issue, sentinel_set.url)
        timings = run(failover_under_traffic(servers, issue, revoked, ["news", "sport"], sentinel_set.kill_master))
        print("\nsentinel failover: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    finally:
        for server in servers:
            server.stop()


CLUSTER_CHANNELS = ["news", "sport", "weather", "markets", "chat.1", "chat.2"]


def test_cluster_failover_under_traffic(keydir, issue, cluster_set):
    masters = {cluster_set.master_of("sws:h:{" + channel + "}").port for channel in CLUSTER_CHANNELS}
    assert len(masters) >= 2, "the channels should spread over the masters"
    servers = _servers(keydir, cluster_set.url)
    try:
        revoked = _revoked(keydir, issue, cluster_set.url)
        victim = cluster_set.master_of("sws:h:{news}")
        timings = run(failover_under_traffic(servers, issue, revoked, CLUSTER_CHANNELS, lambda: cluster_set.kill(victim)))
        print("\ncluster failover: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    finally:
        for server in servers:
            server.stop()
