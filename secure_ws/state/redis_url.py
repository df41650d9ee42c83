"""``SECURE_WS_STORAGE_URL`` for Redis: one server, Sentinel or Cluster, plain or TLS, parsed without importing
redis (the settings check it at start-up) and turned into redis-py's client by :func:`connect`.

* ``redis://[[user]:password@]host:port[/db]`` — one Redis (``rediss://`` over TLS);
* ``redis+sentinel://[[user]:password@]host:port[,host:port…]/SERVICE[/db]`` — the master Sentinel names
  SERVICE, asked again on every reconnect; the password is the master's (``rediss+sentinel://``: TLS to the
  sentinels and to the master);
* ``redis+cluster://[[user]:password@]host:port[,host:port…]`` — Redis Cluster ≥ 7, any reachable nodes to
  start from (``rediss+cluster://``).

The query may name ``ssl_ca_certs=PATH`` (a private CA, as redis-py spells it) and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

SINGLE, SENTINEL, CLUSTER = "single", "sentinel", "cluster"
_KINDS = {"redis": SINGLE, "redis+sentinel": SENTINEL, "redis+cluster": CLUSTER}
MAX_NODES = 64  # start-up nodes or sentinels one URL may list
TIMEOUT = 2.0  # seconds for a connect or an answer: beyond, Redis counts as unreachable (handshakes get 1013)
HEALTH_CHECK_INTERVAL = 2  # seconds idle after which a pooled connection is PINGed before use
# Connections one process may hold to one Redis server at once (opened only as concurrent calls need them);
# redis-py's default, 100, fails the 101st concurrent call (a burst of frames each hitting the rate limiter) as
# if Redis were down. Redis's own maxclients (10,000 by default) must cover workers × hosts × what they use.
MAX_CONNECTIONS = 1000


@dataclass(frozen=True, slots=True)
class RedisTarget:
    kind: str  # SINGLE, SENTINEL or CLUSTER
    tls: bool
    nodes: tuple[tuple[str, int], ...]
    service: str = ""  # Sentinel's master name
    db: int = 0
    username: str | None = None
    password: str | None = None
    ca_certs: str | None = None


def _port(text: str, url: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port {text[:20]!r} in {url}")
    return int(text)


def _nodes(netloc: str, url: str) -> tuple[tuple[str, int], ...]:
    nodes = []
    for entry in netloc.split(","):
        if entry.startswith("["):  # [IPv6]:port
            host, sep, rest = entry[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
            if not sep:
                raise ValueError(f"bad address {entry[:60]!r} in {url}")
        else:
            host, _, port = entry.rpartition(":") if ":" in entry else (entry, "", "")
        if not host:
            raise ValueError(f"missing host in {url}")
        nodes.append((host, _port(port, url) if port else 6379))
    if len(nodes) > MAX_NODES:
        raise ValueError(f"more than {MAX_NODES} addresses in {url}")
    return tuple(nodes)


def parse_redis_url(url: str) -> RedisTarget:
    """The target ``url`` names, or ``ValueError`` saying what is wrong (the password never repeated)."""
    scheme, sep, rest = url.partition("://")
    tls = scheme.startswith("rediss")
    kind = _KINDS.get(scheme.replace("rediss", "redis", 1))
    if not sep or kind is None:
        raise ValueError(
            f"unknown scheme {scheme[:30]!r}: use redis://, redis+sentinel:// or redis+cluster:// (rediss… for TLS)"
        )
    shown = f"{scheme}://…"  # what a message may quote: never the password
    parts = urlsplit("redis://" + rest)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at:
        hosts = parts.netloc
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
        if not colon:  # redis://secret@host: the one field is the password, as redis-py reads it
            username, password = None, unquote(user)
    if not hosts:
        raise ValueError(f"no host:port in {shown}")
    nodes = _nodes(hosts, shown)
    if kind == SINGLE and len(nodes) > 1:
        raise ValueError(f"{scheme}:// takes one host:port; several are for redis+sentinel:// or redis+cluster://")
    path = [segment for segment in parts.path.split("/") if segment]
    service, db = "", 0
    if kind == SENTINEL:
        if not path:
            raise ValueError(f"{shown} names no service: {scheme}://host:port[,host:port…]/SERVICE[/db]")
        service, path = unquote(path[0]), path[1:]
    if kind == CLUSTER and path:
        raise ValueError(f"{scheme}:// takes no path: Redis Cluster has only database 0")
    if len(path) > 1 or (path and not path[0].isdigit()):
        raise ValueError(f"bad database {'/'.join(path)[:30]!r} in {shown}: a number")
    if path:
        db = int(path[0])
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"ssl_ca_certs"})
    if unknown:
        raise ValueError(f"unknown query parameter {unknown[0][:40]!r} in {shown}: only ssl_ca_certs=PATH")
    ca_certs = query.get("ssl_ca_certs", [None])[-1]
    if ca_certs is not None and not tls:
        raise ValueError(f"ssl_ca_certs needs TLS: use {scheme.replace('redis', 'rediss', 1)}://")
    if ca_certs == "":
        raise ValueError("ssl_ca_certs= names no file")
    return RedisTarget(kind, tls, nodes, service, db, username, password, ca_certs)


def _options(target: RedisTarget) -> dict[str, Any]:
    """What every connection to a Redis server of ``target`` takes."""
    options: dict[str, Any] = {
        "socket_connect_timeout": TIMEOUT, "socket_timeout": TIMEOUT, "health_check_interval": HEALTH_CHECK_INTERVAL,
        "username": target.username, "password": target.password,
        "max_connections": MAX_CONNECTIONS,
    }
    if target.tls:
        options["ssl"] = True
        if target.ca_certs is not None:
            options["ssl_ca_certs"] = target.ca_certs
    return options


def connect(target: RedisTarget) -> Any:
    """redis-py's asyncio client for ``target`` (a ``Redis``, or a ``RedisCluster``); connects lazily."""
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel
    from redis.backoff import NoBackoff

    options = _options(target)
    if target.kind == CLUSTER:
        # One immediate retry: a node found gone makes the client re-read the slots, and the retry goes to the
        # replica promoted in its place; a MOVED/ASK is followed by the client itself, not counted here.
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes], retry=Retry(NoBackoff(), 1),
            **options,
        )
    # No retry: a call fails within TIMEOUT and is answered `unavailable` (a handshake 1013); the next call
    # reconnects (through Sentinel: to whichever master it names now).
    options["retry"] = Retry(NoBackoff(), 0)
    if target.kind == SENTINEL:
        sentinel_options = {k: v for k, v in options.items() if k not in ("username", "password")}
        sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_options, **options)
        return sentinel.master_for(target.service, db=target.db)
    host, port = target.nodes[0]
    return aioredis.Redis(host=host, port=port, db=target.db, **options)
