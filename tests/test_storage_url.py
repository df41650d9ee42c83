"""SPEC §15: the Redis forms of ``SECURE_WS_STORAGE_URL`` — one server, Sentinel, Cluster, each over TLS — are
read as redis-py would use them, and every malformed one is refused with a sentence saying what is wrong, never
repeating the password; ``rediss://`` with a private CA carries the service over a real TLS-only redis-server,
and without the CA the server refuses to fail open."""

from __future__ import annotations

import socket
import subprocess

import pytest
import websockets
from helpers import Server, base_env, free_port, recv_json, request, run, wait_for, welcome

from secure_ws.settings import ConfigError, load_settings
from secure_ws.state.redis_url import CLUSTER, SENTINEL, SINGLE, RedisTarget, parse_redis_url


@pytest.mark.parametrize("url,expected", [
    ("redis://127.0.0.1:6379/0", RedisTarget(SINGLE, False, (("127.0.0.1", 6379),))),
    ("redis://cache", RedisTarget(SINGLE, False, (("cache", 6379),))),
    ("rediss://:s3cret@cache:6380/2?ssl_ca_certs=/etc/ca.pem",
     RedisTarget(SINGLE, True, (("cache", 6380),), db=2, password="s3cret", ca_certs="/etc/ca.pem")),
    ("redis://app:pw@[::1]:7000/1", RedisTarget(SINGLE, False, (("::1", 7000),), db=1, username="app", password="pw")),
    ("redis+sentinel://:pw@s1:26379,s2:26380,s3/mymaster",
     RedisTarget(SENTINEL, False, (("s1", 26379), ("s2", 26380), ("s3", 6379)), "mymaster", password="pw")),
    ("rediss+sentinel://s1:26379/mymaster/3?ssl_ca_certs=ca.pem",
     RedisTarget(SENTINEL, True, (("s1", 26379),), "mymaster", db=3, ca_certs="ca.pem")),
    ("redis+cluster://c1:7000,c2:7001", RedisTarget(CLUSTER, False, (("c1", 7000), ("c2", 7001)))),
    ("rediss+cluster://:p%40ss@c1:7000/", RedisTarget(CLUSTER, True, (("c1", 7000),), password="p@ss")),
])
def test_forms_are_read(url, expected):
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize("url,says", [
    ("ftp://x", "unknown scheme"),
    ("redis+mongo://x:1", "unknown scheme"),
    ("redis://", "no host:port"),
    ("redis://a:1,b:2/0", "takes one host:port"),
    ("redis://host:99999/0", "bad port"),
    ("redis://host:port/0", "bad port"),
    ("redis://host:6379/zero", "bad database"),
    ("redis://host:6379/0/1", "bad database"),
    ("redis+sentinel://s1:26379,s2:26379", "names no service"),
    ("redis+sentinel://s1:26379/mymaster/x", "bad database"),
    ("redis+cluster://c1:7000/1", "takes no path"),
    ("redis://host:6379/0?ssl_ca_certs=/ca.pem", "needs TLS"),
    ("rediss://host:6379/0?ssl_ca_certs=", "names no file"),
    ("rediss://host:6379/0?ssl_cert_reqs=none", "unknown query parameter"),
    ("redis+cluster://" + ",".join(f"h{i}:7000" for i in range(65)), "more than 64"),
])
def test_malformed_forms_are_refused_saying_why(url, says):
    with pytest.raises(ValueError, match=says):
        parse_redis_url(url)


def test_the_password_is_never_repeated_in_a_refusal():
    for url in ("redis+sentinel://:hunter2hunter2@s1:26379", "redis+cluster://:hunter2hunter2@c1:7000/9",
                "redis://:hunter2hunter2@a:1,b:2"):
        with pytest.raises(ConfigError) as caught:
            load_settings(environ={"SECURE_WS_STORAGE_URL": url}, env_file=None)
        assert "SECURE_WS_STORAGE_URL" in str(caught.value) and "hunter2" not in str(caught.value), caught.value
        assert "\n" not in str(caught.value)


# -- TLS to a real Redis -------------------------------------------------------------------------------


@pytest.fixture
def tls_redis(keydir, tmp_path):
    """A redis-server speaking only TLS, with the dev CA's server certificate (for ``localhost``)."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(keydir / "server.crt"), "--tls-key-file", str(keydir / "server.key"),
         "--tls-ca-cert-file", str(keydir / "ca.crt"), "--tls-auth-clients", "no", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listening(port), 10, "redis-server listening for TLS")
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_rediss_with_a_private_ca_carries_the_service(keydir, issue, tls_redis):
    url = f"rediss://localhost:{tls_redis}/0?ssl_ca_certs={keydir / 'ca.crt'}"
    a, b = (Server(keydir, base_env(keydir, SECURE_WS_STORAGE_URL=url)).start() for _ in range(2))

    async def go() -> None:
        async with a.connect(issue(scope="subscribe:* publish:*")) as sub, b.connect(issue(scope="subscribe:* publish:*")) as pub:
            await welcome(sub)
            await welcome(pub)
            assert (await request(sub, {"type": "subscribe", "channel": "tls"}))["type"] == "subscribed"
            assert (await request(pub, {"type": "publish", "channel": "tls", "data": "over TLS"}))["type"] == "published"
            assert (await recv_json(sub))["data"] == "over TLS"

    try:
        assert a.get("/readyz")[0] == 200
        run(go())
    finally:
        a.stop()
        b.stop()


def test_rediss_with_an_untrusted_certificate_never_fails_open(keydir, issue, tls_redis):
    """Without the private CA the Redis certificate is not trusted: not ready, handshakes 1013, never admitted."""
    server = Server(keydir, base_env(keydir, SECURE_WS_STORAGE_URL=f"rediss://localhost:{tls_redis}/0")).start()
    try:
        assert server.get("/readyz")[0] == 503
        assert "SECURE_WS_STORAGE_URL" in server.log() and "rediss://localhost" in server.log()

        async def go() -> None:
            async with server.connect(issue()) as ws:
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await recv_json(ws)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013

        run(go())
    finally:
        server.stop()
