"""Revocations that nothing but their expiry takes back (SPEC §4, §6), on a live uvicorn over TLS.

Redis is a fast copy between workers, never the only one: ``token revoke`` writes the revocation
file first in every mode, workers merge what any source says into what they know (never replace),
and write back into Redis whatever it lacks. Each Redis test starts its own ``redis-server`` on a
spare port without persistence, so restarting it really empties it; the shared one is never touched.
Also here: a revocation file that cannot be read, is deleted, or is edited in place; SIGHUP; the
``--sub`` cut-off against fractional ``iat``; key material replaced under the same ``kid``; and a
Redis that is down when the server starts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from helpers import Server, base_env, cli, closed_with, free_port, refusal, request, run, unique_sub, wait_for, welcome
from test_redis_outage import handshake_outcome

REVOKE_WITHIN = 2.0  # SPEC §4
RECOVERY_DEADLINE = 10.0
# Longer than redis_storage.REVOCATION_RESYNC_INTERVAL (5 s): the re-read that used to adopt an empty Redis.
RESYNC_WINDOW = 12.0
UNAVAILABLE = ("closed", 1013, "service unavailable")
REVOKED = ("closed", 1008, "token revoked")


def jti_of(token: str) -> str:
    return jwt.decode(token, options={"verify_signature": False})["jti"]


def readyz(srv: Server) -> int:
    return srv.get("/readyz")[0]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def servers(keydir: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(env: dict[str, str]) -> Server:
        srv = Server(keydir, env).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def redis_env(keydir: Path, tmp_path: Path, url: str) -> dict[str, str]:
    return base_env(keydir, SECURE_WS_STORAGE_URL=url, SECURE_WS_REVOCATION_FILE=str(tmp_path / "revocations.json"))


def memory_env(keydir: Path, tmp_path: Path) -> dict[str, str]:
    return base_env(keydir, SECURE_WS_REVOCATION_FILE=str(tmp_path / "revocations.json"))


# == Redis loses the revocations ============================================================


@pytest.mark.parametrize("loss", ["restart empty", "flushall"])
def test_revocations_survive_redis_losing_them(keydir, tmp_path, own_redis, servers, issue, loss):
    rds = own_redis()
    env = redis_env(keydir, tmp_path, rds.url)
    srv = servers(env)
    leaked, lost_sub = issue(), unique_sub("lost")
    lost = issue(sub=lost_sub)
    cli(keydir, "token", "revoke", f"--jti={jti_of(leaked)}", env=env)
    cli(keydir, "token", "revoke", "--sub", lost_sub, env=env)

    async def go() -> None:
        assert await handshake_outcome(srv, leaked) == REVOKED
        assert await handshake_outcome(srv, lost) == REVOKED
        if loss == "restart empty":
            port = rds.port
            rds.kill()
            await asyncio.to_thread(own_redis, port)
        else:
            client = redis.Redis(host="127.0.0.1", port=rds.port)
            client.flushall()
            client.close()
        client = redis.Redis(host="127.0.0.1", port=rds.port)
        try:
            # Through the re-read that used to adopt the empty lists, until the worker has written them back:
            # not one handshake of a revoked token is welcomed.
            started = time.monotonic()
            while True:
                for token in (leaked, lost):
                    outcome = await handshake_outcome(srv, token)
                    assert outcome in (REVOKED, UNAVAILABLE), f"revoked token after Redis {loss}: {outcome}"
                back = client.hexists("sws:{rev}:jti", jti_of(leaked)) and client.hexists("sws:{rev}:sub", lost_sub)
                if back and time.monotonic() - started > RESYNC_WINDOW:
                    break
                assert time.monotonic() - started < RESYNC_WINDOW + RECOVERY_DEADLINE, "never written back to Redis"
                await asyncio.sleep(0.1)  # pacing only, on a shared 2-core machine: the loop waits for `back`
        finally:
            client.close()
        assert await handshake_outcome(srv, leaked) == REVOKED
        assert (await handshake_outcome(srv, issue()))[0] == "welcome"

    run(go())
    assert "Traceback" not in srv.log()
    assert "wrote them back" in srv.log()
    # What the worker wrote back came from its memory; the ops command also wrote the durable copy.
    written = json.loads((tmp_path / "revocations.json").read_text())
    assert jti_of(leaked) in written["jti"] and lost_sub in written["sub"], written


def test_a_worker_started_on_an_empty_redis_loads_the_file(keydir, tmp_path, own_redis, servers, issue):
    rds = own_redis()
    env = redis_env(keydir, tmp_path, rds.url)
    leaked, lost_sub = issue(), unique_sub("lost")
    lost = issue(sub=lost_sub)
    cli(keydir, "token", "revoke", f"--jti={jti_of(leaked)}", env=env)
    cli(keydir, "token", "revoke", "--sub", lost_sub, env=env)
    port = rds.port
    rds.kill()
    fresh = own_redis(port)  # empty: no worker was running to write anything back
    srv = servers(env)

    async def go() -> None:
        assert await handshake_outcome(srv, leaked) == REVOKED
        assert await handshake_outcome(srv, lost) == REVOKED
        assert (await handshake_outcome(srv, issue()))[0] == "welcome"

    run(go())
    client = redis.Redis(host="127.0.0.1", port=fresh.port)
    try:
        wait_for(lambda: client.hexists("sws:{rev}:jti", jti_of(leaked)), RECOVERY_DEADLINE, "file written back to Redis")
    finally:
        client.close()


def test_unreachable_redis_at_start_refuses_then_recovers(keydir, tmp_path, own_redis, servers, issue):
    port = free_port()
    env = redis_env(keydir, tmp_path, f"redis://127.0.0.1:{port}/0")
    srv = servers(env)  # starts: it must not die on a Redis that is not there yet

    async def go() -> None:
        assert await asyncio.to_thread(readyz, srv) == 503
        assert await handshake_outcome(srv, issue()) == UNAVAILABLE
        await asyncio.to_thread(own_redis, port)
        await asyncio.to_thread(wait_for, lambda: readyz(srv) == 200, RECOVERY_DEADLINE, "/readyz 200")
        async with srv.connect(issue()) as ws:
            await welcome(ws)
            assert await request(ws, {"type": "ping"}) == {"type": "pong"}

    run(go())
    log = srv.log()
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "SECURE_WS_STORAGE_URL" in line]
    assert len(lines) == 1, lines
    assert f"127.0.0.1:{port}" in lines[0], lines


# == the revocation file ====================================================================


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.test")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_unreadable_revocation_file_refuses_handshakes_until_readable(keydir, tmp_path, servers, issue):
    env = memory_env(keydir, tmp_path)
    path = tmp_path / "revocations.json"
    cli(keydir, "token", "revoke", "--jti", "placeholder", env=env)
    good = path.read_text()
    srv = servers(env)
    token = issue()

    async def go() -> None:
        assert (await handshake_outcome(srv, token))[0] == "welcome"
        write_atomically(path, '{"jti": {"a": ')
        await asyncio.to_thread(wait_for, lambda: readyz(srv) == 503, REVOKE_WITHIN, "/readyz 503")
        assert await handshake_outcome(srv, token) == UNAVAILABLE
        write_atomically(path, '{"jti": {"a": "not a number"}}')  # valid JSON, not a revocation list
        await asyncio.to_thread(wait_for, lambda: "could not convert" in srv.log(), REVOKE_WITHIN, "new problem logged")
        assert await handshake_outcome(srv, token) == UNAVAILABLE
        write_atomically(path, good)
        await asyncio.to_thread(wait_for, lambda: readyz(srv) == 200, REVOKE_WITHIN, "/readyz 200")
        assert (await handshake_outcome(srv, token))[0] == "welcome"

    run(go())
    errors = [line for line in srv.log().splitlines() if "cannot read SECURE_WS_REVOCATION_FILE" in line]
    assert len(errors) == 2 and all(str(path) in line for line in errors), errors  # once per problem, not per poll


def test_deleted_revocation_file_keeps_what_was_known(keydir, tmp_path, servers, issue):
    env = memory_env(keydir, tmp_path)
    path = tmp_path / "revocations.json"
    srv = servers(env)
    first, second = issue(), issue()
    cli(keydir, "token", "revoke", f"--jti={jti_of(first)}", env=env)

    async def go() -> None:
        while await handshake_outcome(srv, first) != REVOKED:
            pass  # picked up by the poll; the assertion below bounds the wait
        path.unlink()
        observed = time.monotonic()
        while time.monotonic() - observed < 1.5:  # several polls (0.5 s apart) of the missing file
            assert await handshake_outcome(srv, first) == REVOKED
        assert "is missing" in srv.log()
        # The next revoke writes the file again, with only its own entry: the first one is still known.
        cli(keydir, "token", "revoke", f"--jti={jti_of(second)}", env=env)
        await asyncio.to_thread(wait_for, path.exists, REVOKE_WITHIN, "file written again")
        while await handshake_outcome(srv, second) != REVOKED:
            pass
        assert await handshake_outcome(srv, first) == REVOKED

    run(asyncio.wait_for(go(), 20))
    assert srv.log().count("is missing") == 1


def edit_in_place(path: Path, old: str, new: str) -> None:
    """Same inode, size and mtime: only ctime (or the content) shows the change."""
    before = path.stat()
    text = path.read_bytes()
    assert len(old) == len(new) and old.encode() in text
    with open(path, "r+b") as fh:
        fh.write(text.replace(old.encode(), new.encode()))
        fh.flush()
        os.fsync(fh.fileno())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


def test_in_place_edit_of_the_revocation_file_is_seen(keydir, tmp_path, servers, issue):
    env = memory_env(keydir, tmp_path)
    path = tmp_path / "revocations.json"
    token = issue()
    placeholder = "p" * len(jti_of(token))
    cli(keydir, "token", "revoke", f"--jti={placeholder}", env=env)
    srv = servers(env)

    async def go() -> None:
        async with srv.connect(token) as ws:
            await welcome(ws)
            edit_in_place(path, placeholder, jti_of(token))
            edited = time.monotonic()
            assert await closed_with(ws, REVOKE_WITHIN + 1) == (1008, "token revoked")
            assert time.monotonic() - edited <= REVOKE_WITHIN
        assert await handshake_outcome(srv, token) == REVOKED

    run(go())


def test_sighup_reloads_revocations(keydir, tmp_path, servers, issue):
    env = memory_env(keydir, tmp_path)
    cli(keydir, "token", "revoke", "--jti", "one", env=env)
    cli(keydir, "token", "revoke", "--sub", unique_sub("hup"), env=env)
    srv = servers(env)
    srv.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "revocations: reloaded, 2 known" in srv.log(), REVOKE_WITHIN, "revocations reloaded on SIGHUP")
    assert srv.proc.poll() is None
    assert run(handshake_outcome(srv, issue()))[0] == "welcome"


# == --sub and fractional iat ===============================================================


def test_revoke_sub_covers_a_token_with_a_fractional_iat_from_the_same_second(server, keydir, issue):
    sub = unique_sub("frac")
    # Just after a second boundary, so the revoke below runs within the same second (the CLI takes ~0.25 s):
    # a cut-off rounded down to that second would miss this token, issued a moment before the revoke.
    wait_for(lambda: time.time() % 1 < 0.05, 2, "start of a second")
    iat = time.time()
    token = issue(sub=sub, iat=iat, exp=math.floor(iat) + 600)

    async def go() -> None:
        async with server.connect(token) as ws:
            await welcome(ws)
            await asyncio.to_thread(cli, keydir, "token", "revoke", "--sub", sub)
            returned = time.monotonic()
            assert await closed_with(ws, REVOKE_WITHIN + 1) == (1008, "token revoked")
            assert time.monotonic() - returned <= REVOKE_WITHIN
        assert await refusal(server, token) == (1008, "token revoked")
        # Issued after the command returned (whole-second iat, as ours are): untouched.
        async with server.connect(issue(sub=sub)) as ws:
            await welcome(ws)

    run(go())


# == key material replaced under the same kid ===============================================


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_replacing_a_keys_material_under_its_kid_closes_its_connections(tmp_path):
    folder = tmp_path  # keys of its own: this test edits them
    cli(folder, "certs", "--out", str(folder))
    kid = cli(folder, "keys", "rotate").stdout.strip()
    token = cli(folder, "token", "issue", "--sub", unique_sub("swap")).stdout.strip()
    srv = Server(folder, base_env(folder)).start()
    try:
        async def go() -> None:
            async with srv.connect(token) as ws:
                await welcome(ws)
                jwks = folder / "jwks.json"
                document = json.loads(jwks.read_text())
                other = ed25519.Ed25519PrivateKey.generate().public_key()
                raw = other.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
                (key,) = [k for k in document["keys"] if k["kid"] == kid]
                key["x"] = _b64(raw)
                write_atomically(jwks, json.dumps(document))
                swapped = time.monotonic()
                assert await closed_with(ws, REVOKE_WITHIN + 1) == (1008, "token revoked")
                assert time.monotonic() - swapped <= REVOKE_WITHIN
            assert await refusal(srv, token) == (1008, "invalid token")

        run(go())
    finally:
        srv.stop()


def test_revocations_under_the_names_before_cluster_support_are_still_enforced(keydir, own_redis, issue):
    """An upgrade from a release that kept revocations in ``sws:rev:jti``/``sws:rev:sub``: still enforced, and
    written back under the hash-tagged names."""
    redis_server = own_redis()
    token = issue(scope="subscribe:*")
    sub_token = issue(unique_sub("legacy"), scope="subscribe:*")
    client = redis_server.client()
    try:
        client.hset("sws:rev:jti", jti_of(token), repr(time.time() + 3600))
        client.hset("sws:rev:sub", jwt.decode(sub_token, options={"verify_signature": False})["sub"],
                    f"{time.time() + 1!r}:{time.time() + 3600!r}")
        srv = Server(keydir, base_env(keydir, SECURE_WS_STORAGE_URL=redis_server.url)).start()
        try:
            for revoked in (token, sub_token):
                assert run(handshake_outcome(srv, revoked)) == ("closed", 1008, "token revoked")
            wait_for(lambda: client.hexists("sws:{rev}:jti", jti_of(token)), 10, "written back under the new name")
        finally:
            srv.stop()
    finally:
        client.close()
