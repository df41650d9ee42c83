"""SPEC §15: the Redis forms of ``SECURE_WS_STORAGE_URL`` — one server, Sentinel, Cluster, each over TLS — are
read as redis-py would use them, and every malformed one is refused with a sentence saying what is wrong, never
repeating the password."""

from __future__ import annotations

import pytest

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
