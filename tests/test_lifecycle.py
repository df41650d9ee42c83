"""Keys and tokens over their whole life (SPEC §3, §4, §6), against a live uvicorn over TLS.

Every operator action is the real ``python -m secure_ws …`` command (or ``scripts/rotate_keys.py``)
run as a subprocess while connections are open. Tests that change key files get a folder of their
own (``fresh_dir``); the others share one folder and one server per module.

The identity-provider tests each get an IdP and a server of their own: the server fetches the
IdP's JWK Set at start-up and then refetches on an unknown ``kid`` at most once per 30 s (README,
"Identity providers"), so the forged-kid storm runs inside that window, and the rotation test waits
it out: the passing of that time is what it tests.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import os
import re
import secrets
import signal
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from helpers import (
    ROOT,
    Server,
    base_env,
    cli,
    closed_with,
    refusal,
    request,
    run,
    signing_key,
    unique_sub,
    wait_for,
    welcome,
)
from jwt.algorithms import OKPAlgorithm

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
REVOKE_WITHIN = 2.0  # SPEC §4 / §6
PONG = {"type": "pong"}


# -- helpers -------------------------------------------------------------------------------


def make_dir(path: Path) -> Path:
    cli(path, "certs", "--out", str(path))
    cli(path, "keys", "rotate")
    return path


def issue(path: Path, sub: str, ttl: str = "10m") -> str:
    return cli(path, "token", "issue", "--sub", sub, "--ttl", ttl).stdout.strip()


def _b64json(part: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def claims(token: str) -> dict[str, Any]:
    """The payload, unverified (as an operator would read a jti off a token)."""
    return _b64json(token.split(".")[1])


def header(token: str) -> dict[str, Any]:
    return _b64json(token.split(".")[0])


# kids (RFC 7638 thumbprints) and jtis are base64url, so about one in 64 begins with "-". The main
# flows pass them in a form that never reads as an option; the plain forms `keys retire KID` and
# `token revoke --jti J` with a leading "-" have their own tests below.
def kid_arg(kid: str) -> tuple[str, ...]:
    return ("--", kid)


def jti_arg(jti: str) -> str:
    return f"--jti={jti}"


def key_statuses(path: Path) -> dict[str, str]:
    """``keys list`` → {kid: status}."""
    out = cli(path, "keys", "list").stdout.splitlines()
    assert out and out[0].split()[0] == "kid", out
    return {line.split()[0]: line.split()[-1] for line in out[1:] if line.strip()}


def served_jwks(srv: Server) -> list[dict[str, Any]]:
    status, headers, body = srv.get("/.well-known/jwks.json")
    assert status == 200, (status, body)
    document = json.loads(body)
    assert isinstance(document.get("keys"), list), document
    return document["keys"]


def wait_for_served_kids(srv: Server, expected: set[str], within: float = REVOKE_WITHIN + 0.5) -> None:
    deadline = time.monotonic() + within
    while True:
        kids = {k.get("kid") for k in served_jwks(srv)}
        if kids == expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"server still serves {kids}, expected {expected} after {within}s")
        time.sleep(0.1)


async def welcomed(srv: Server, token: str) -> dict[str, Any]:
    """A new connection with ``token`` is welcomed and usable."""
    async with srv.connect(token) as ws:
        hello = await welcome(ws)
        assert await request(ws, {"type": "ping"}) == PONG
        return hello


async def eventually_welcomed(srv: Server, token: str, within: float = REVOKE_WITHIN + 0.5) -> float:
    """Retry the handshake until it is welcomed (a reload is allowed to take up to 2 s)."""
    started = time.monotonic()
    last: Any = None
    while time.monotonic() - started < within:
        async with srv.connect(token) as ws:
            try:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            except Exception as exc:  # closed: not yet
                last = exc
            else:
                assert frame["type"] == "welcome", frame
                return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"token not welcomed within {within}s (last: {last!r})")


async def watch_close(ws: Any, timeout: float = 10.0) -> tuple[int, str, float]:
    try:
        code, reason = await closed_with(ws, timeout)
    except TimeoutError:
        raise AssertionError(f"the server did not close the connection within {timeout:.1f}s") from None
    return code, reason, time.time()


async def run_while_watching(argv_runner: Any, sockets: list[Any]) -> tuple[Any, float, list[tuple[int, str, float]]]:
    """Start watching ``sockets`` for their close, run the ops command in a thread, collect closes.

    Returns (command result, wall time the command returned, [(code, reason, wall time of close)]).
    """
    watchers = [asyncio.create_task(watch_close(ws)) for ws in sockets]
    await asyncio.sleep(0)
    result = await asyncio.to_thread(argv_runner)
    returned = time.time()
    closes = await asyncio.gather(*watchers)
    return result, returned, closes


def assert_revoked_in_time(closes: list[tuple[int, str, float]], returned: float, reason: str = "token revoked") -> None:
    for code, why, at in closes:
        assert (code, why) == (1008, reason)
        assert at - returned <= REVOKE_WITHIN, f"closed {at - returned:.2f}s after the command returned"


def rewrite_invisibly(path: Path, document: dict[str, Any]) -> None:
    """Rewrite ``path`` in place with the same inode, size and mtime, so only a forced reload sees it."""
    before = path.stat()
    text = json.dumps(document, indent=2).encode()
    assert len(text) <= before.st_size, "the new document must not be larger than the old one"
    text += b" " * (before.st_size - len(text))
    with open(path, "r+b") as fh:
        fh.seek(0)
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def fresh_dir(tmp_path: Path) -> Path:
    """A folder of its own (dev CA, server certificate, one EdDSA signing key) for tests that change keys."""
    return make_dir(tmp_path)


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """For tests that only add revocations (unique jti / sub each): keys never change here."""
    return make_dir(tmp_path_factory.mktemp("lifecycle"))


@pytest.fixture(scope="module")
def shared_server(shared_dir: Path) -> Iterator[Server]:
    # Leeway 0 so that expiry is observable within seconds.
    srv = Server(shared_dir, base_env(shared_dir, SECURE_WS_JWT_LEEWAY_SECONDS="0")).start()
    yield srv
    srv.stop()


@pytest.fixture
def start(make_server):
    """``start(folder, **env)``: a server on the key folder ``folder``."""
    return lambda path, **extra: make_server(keys=path, **extra)


# -- a local identity provider ---------------------------------------------------------------


class IdP:
    """An HTTPS JWKS endpoint in a thread, with its own dev CA; counts every fetch."""

    def __init__(self, folder: Path) -> None:
        from secure_ws.tls import make_dev_certs

        folder.mkdir(parents=True, exist_ok=True)
        paths = make_dev_certs(folder)
        self.ca = paths["ca"]
        self.private: dict[str, ed25519.Ed25519PrivateKey] = {}
        self.fetches: list[float] = []
        self._document = b'{"keys": []}'
        self._lock = threading.Lock()
        idp = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                with idp._lock:
                    if self.path == "/jwks.json":
                        idp.fetches.append(time.monotonic())
                    body = idp._document
                if self.path != "/jwks.json":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(paths["cert"]), str(paths["key"]))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/jwks.json"

    def add_key(self, kid: str) -> None:
        self.private[kid] = ed25519.Ed25519PrivateKey.generate()
        keys = []
        for k, private in self.private.items():
            jwk = OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
            keys.append({**jwk, "kid": k, "alg": "EdDSA", "use": "sig"})
        with self._lock:
            self._document = json.dumps({"keys": keys}).encode()

    def sign(self, kid: str, sub: str, key: Any = None, ttl: int = 600) -> str:
        now = int(time.time())
        payload = {"iss": "secure-ws", "aud": "secure-ws", "sub": sub, "iat": now, "exp": now + ttl,
                   "jti": secrets.token_urlsafe(12)}
        return jwt.encode(payload, key or self.private[kid], algorithm="EdDSA", headers={"kid": kid})

    def count(self) -> int:
        with self._lock:
            return len(self.fetches)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def idp_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[IdP, Server]]:
    folder = make_dir(tmp_path_factory.mktemp("idp-client"))
    idp = IdP(folder / "idp")  # its own CA and certificate: the server's files stay untouched
    idp.add_key("idp-1")
    srv = Server(folder, base_env(folder, SECURE_WS_JWKS_URL=idp.url, SSL_CERT_FILE=str(idp.ca))).start()
    yield idp, srv
    srv.stop()
    idp.stop()


async def forged_kid_storm(srv: Server, n: int = 20) -> None:
    stranger = ed25519.Ed25519PrivateKey.generate()
    now = int(time.time())
    tokens = [
        jwt.encode(
            {"iss": "secure-ws", "aud": "secure-ws", "sub": unique_sub("forger"), "iat": now, "exp": now + 600},
            stranger, algorithm="EdDSA", headers={"kid": secrets.token_urlsafe(12)},
        )
        for _ in range(n)
    ]
    results = await asyncio.gather(*(refusal(srv, t) for t in tokens))
    assert results == [(1008, "invalid token")] * n


# == identity provider: a forged-kid storm inside the start-up fetch's 30 s window ==================


def test_idp_key_is_fetched_at_startup_and_forged_kids_cause_no_fetch_storm(idp_setup):
    idp, srv = idp_setup
    assert idp.count() == 1, "the IdP's JWK Set is fetched once at start-up"
    hello = run(welcomed(srv, idp.sign("idp-1", "idp-user")))
    assert hello["sub"] == "idp-user"
    assert "idp-1" in {k["kid"] for k in served_jwks(srv)}
    assert idp.count() == 1, "a known kid needs no fetch"

    before = idp.count()
    run(forged_kid_storm(srv))  # 20 concurrent handshakes, each with a random unknown kid
    run(forged_kid_storm(srv))
    extra = idp.count() - before
    assert extra <= 1, f"40 forged kids caused {extra} fetches of the IdP"
    assert "Traceback" not in srv.log()


# == rotation, listing, retirement ===========================================================


def test_rotate_while_connected_keeps_old_and_welcomes_both_keys(fresh_dir, start):
    srv = start(fresh_dir)
    old = issue(fresh_dir, unique_sub("rot"))
    kid1 = header(old)["kid"]
    assert key_statuses(fresh_dir) == {kid1: "active"}

    async def go() -> None:
        async with srv.connect(old) as ws_old:
            await welcome(ws_old)
            kid2 = cli(fresh_dir, "keys", "rotate").stdout.strip()
            assert kid2 and kid2 != kid1
            new = issue(fresh_dir, unique_sub("rot"))
            assert header(new)["kid"] == kid2, "new tokens are signed by the new active key"
            await eventually_welcomed(srv, new)  # picked up without a restart, within 2 s
            await welcomed(srv, old)  # the previous key still verifies
            await asyncio.sleep(0.6)  # more than one poll after the reload
            assert await request(ws_old, {"type": "ping"}) == PONG, "rotation must not drop live connections"

            assert key_statuses(fresh_dir) == {kid1: "previous", kid2: "active"}
            served = served_jwks(srv)
            assert {k["kid"] for k in served} == {kid1, kid2}
            for k in served:
                assert not PRIVATE_MEMBERS & set(k), f"private members served: {sorted(PRIVATE_MEMBERS & set(k))}"

    run(go())
    assert stat.S_IMODE((fresh_dir / "signing-keys.json").stat().st_mode) == 0o600
    on_disk = json.loads((fresh_dir / "jwks.json").read_text())["keys"]
    assert all(not PRIVATE_MEMBERS & set(k) for k in on_disk)


def test_retire_closes_live_connections_of_that_key(fresh_dir, start):
    sub_old, sub_new = unique_sub("ret-old"), unique_sub("ret-new")
    old = issue(fresh_dir, sub_old)
    kid1 = header(old)["kid"]
    kid2 = cli(fresh_dir, "keys", "rotate").stdout.strip()
    new = issue(fresh_dir, sub_new)
    srv = start(fresh_dir)

    async def go() -> None:
        async with srv.connect(old) as ws_old, srv.connect(new) as ws_new:
            await welcome(ws_old)
            await welcome(ws_new)
            _, returned, closes = await run_while_watching(lambda: cli(fresh_dir, "keys", "retire", *kid_arg(kid1)), [ws_old])
            assert_revoked_in_time(closes, returned)
            assert await request(ws_new, {"type": "ping"}) == PONG, "the other key's connection stays"
        # The key is gone, so its tokens are simply invalid now.
        assert await refusal(srv, old) == (1008, "invalid token")
        await welcomed(srv, new)
        await welcomed(srv, issue(fresh_dir, sub_old))  # a reissued token (new key) works

    run(go())
    assert key_statuses(fresh_dir) == {kid1: "retired", kid2: "active"}
    assert {k["kid"] for k in served_jwks(srv)} == {kid2}
    retired = next(k for k in json.loads((fresh_dir / "signing-keys.json").read_text())["keys"] if k["kid"] == kid1)
    assert not PRIVATE_MEMBERS & set(retired), "a retired key's private half is erased"


# == revocation ============================================================================


def test_revoke_jti_closes_that_token_only(shared_server, shared_dir):
    srv = shared_server
    sub = unique_sub("jti")
    leaked, other = issue(shared_dir, sub), issue(shared_dir, sub)
    jti = claims(leaked)["jti"]

    async def go() -> None:
        async with srv.connect(leaked) as ws_leaked, srv.connect(other) as ws_other:
            await welcome(ws_leaked)
            await welcome(ws_other)
            out, returned, closes = await run_while_watching(
                lambda: cli(shared_dir, "token", "revoke", jti_arg(jti)), [ws_leaked]
            )
            assert_revoked_in_time(closes, returned)
            written = (shared_dir / "revocations.json").stat().st_mtime
            print(f"\nrevoke --jti: closed {closes[0][2] - written:.3f}s after the revocation was written")
            assert await request(ws_other, {"type": "ping"}) == PONG
        assert await refusal(srv, leaked) == (1008, "token revoked")
        await welcomed(srv, other)
        await welcomed(srv, issue(shared_dir, sub))

    run(go())


def test_revoke_sub_closes_every_connection_of_it(shared_server, shared_dir):
    srv = shared_server
    sub, bystander = unique_sub("lost"), unique_sub("bystander")
    a, b, c = issue(shared_dir, sub), issue(shared_dir, sub), issue(shared_dir, bystander)

    async def go() -> None:
        async with srv.connect(a) as w1, srv.connect(a) as w2, srv.connect(b) as w3, srv.connect(c) as w4:
            for ws in (w1, w2, w3, w4):
                await welcome(ws)
            _, returned, closes = await run_while_watching(
                lambda: cli(shared_dir, "token", "revoke", "--sub", sub), [w1, w2, w3]
            )
            assert_revoked_in_time(closes, returned)
            assert await request(w4, {"type": "ping"}) == PONG, "another sub is untouched"
        assert await refusal(srv, a) == (1008, "token revoked")
        assert await refusal(srv, b) == (1008, "token revoked")
        after = issue(shared_dir, sub)  # issued after the command returned
        assert (await welcomed(srv, after))["sub"] == sub

    run(go())


def test_revocations_survive_a_restart(shared_dir, start):
    sub_j, sub_s = unique_sub("restart-j"), unique_sub("restart-s")
    leaked, kept = issue(shared_dir, sub_j), issue(shared_dir, sub_j)
    lost = issue(shared_dir, sub_s)
    first = start(shared_dir)
    cli(shared_dir, "token", "revoke", jti_arg(claims(leaked)["jti"]))
    cli(shared_dir, "token", "revoke", "--sub", sub_s)
    fresh = issue(shared_dir, sub_s)
    time.sleep(1.0)  # two polls
    assert run(refusal(first, leaked)) == (1008, "token revoked")
    first.stop()

    second = start(shared_dir)  # a new process on the same folder
    assert run(refusal(second, leaked)) == (1008, "token revoked")
    assert run(refusal(second, lost)) == (1008, "token revoked")
    run(welcomed(second, kept))
    run(welcomed(second, fresh))


def test_revoke_accepts_a_jti_that_starts_with_a_dash(shared_server, shared_dir):
    """`token issue` draws jti from base64url: about one token in 64 has a jti like this one."""
    srv = shared_server
    kid, key, alg = signing_key(shared_dir)
    now = int(time.time())
    jti = "-" + secrets.token_urlsafe(12)
    token = jwt.encode(
        {"iss": "secure-ws", "aud": "secure-ws", "sub": unique_sub("dash-jti"), "iat": now, "exp": now + 600, "jti": jti},
        key, algorithm=alg, headers={"kid": kid},
    )

    async def go() -> None:
        async with srv.connect(token) as ws:
            await welcome(ws)
            _, returned, closes = await run_while_watching(
                lambda: cli(shared_dir, "token", "revoke", "--jti", jti), [ws]
            )
            assert_revoked_in_time(closes, returned)
        assert await refusal(srv, token) == (1008, "token revoked")

    run(go())


def test_retire_accepts_a_kid_that_starts_with_a_dash(fresh_dir, start):
    """A kid is the key's RFC 7638 thumbprint in base64url: about one key in 64 has a kid like this one."""
    from secure_ws.auth.signing import generate_jwk, public_part
    from secure_ws.files import write_json

    jwk = next(j for j in iter(lambda: generate_jwk("EdDSA"), None) if j["kid"].startswith("-"))
    kid = jwk["kid"]
    # Leave the files as `keys rotate` would have after this key was superseded.
    private_file, public_file = fresh_dir / "signing-keys.json", fresh_dir / "jwks.json"
    keys = json.loads(private_file.read_text())["keys"]
    now = int(time.time())
    keys.insert(0, {**jwk, "created": now - 60, "superseded": now, "status": "previous"})
    write_json(public_file, {"keys": [public_part(k) for k in keys]}, mode=0o644)
    write_json(private_file, {"keys": keys}, mode=0o600)
    assert key_statuses(fresh_dir)[kid] == "previous"

    srv = start(fresh_dir)
    private = jwt.PyJWK({m: v for m, v in jwk.items()}, algorithm="EdDSA").key
    token = jwt.encode(
        {"iss": "secure-ws", "aud": "secure-ws", "sub": unique_sub("dash-kid"), "iat": now, "exp": now + 600},
        private, algorithm="EdDSA", headers={"kid": kid},
    )

    async def go() -> None:
        async with srv.connect(token) as ws:
            await welcome(ws)
            _, returned, closes = await run_while_watching(lambda: cli(fresh_dir, "keys", "retire", kid), [ws])
            assert_revoked_in_time(closes, returned)
        assert await refusal(srv, token) == (1008, "invalid token")

    run(go())
    assert key_statuses(fresh_dir)[kid] == "retired"


# == expiry and refresh =====================================================================


def test_expiry_closes_at_exp(shared_server, shared_dir):
    srv = shared_server
    token = issue(shared_dir, unique_sub("exp"), ttl="4s")
    exp = claims(token)["exp"]

    async def go() -> None:
        async with srv.connect(token) as ws:
            hello = await welcome(ws)
            assert hello["expires_at"] == exp
            assert await request(ws, {"type": "ping"}) == PONG
            code, reason, at = await watch_close(ws, timeout=exp + 6 - time.time())
            assert (code, reason) == (1008, "token expired")
            assert exp - 0.5 <= at <= exp + 3, f"closed at exp{at - exp:+.2f}s"

    run(go())


def test_refresh_moves_the_deadline(shared_server, shared_dir):
    srv = shared_server
    sub = unique_sub("refresh")
    short, long = issue(shared_dir, sub, ttl="4s"), issue(shared_dir, sub, ttl="10m")
    short_exp, long_exp = claims(short)["exp"], claims(long)["exp"]

    async def go() -> None:
        async with srv.connect(short) as ws:
            await welcome(ws)
            assert await request(ws, {"type": "refresh", "token": long}) == {"type": "refreshed", "expires_at": long_exp}
            await asyncio.sleep(max(0.0, short_exp + 1.5 - time.time()))
            assert await request(ws, {"type": "ping"}) == PONG, "still open after the old exp"

    run(go())


@pytest.mark.parametrize("kind", ["another sub", "garbage"])
def test_refresh_with_a_wrong_token_closes(shared_server, shared_dir, kind):
    srv = shared_server
    sub = unique_sub("refresh-bad")
    token = issue(shared_dir, sub)
    replacement = issue(shared_dir, unique_sub("someone-else")) if kind == "another sub" else "garbage.not.ajwt"

    async def go() -> None:
        async with srv.connect(token) as ws:
            await welcome(ws)
            await ws.send(json.dumps({"type": "refresh", "token": replacement}))
            assert await closed_with(ws) == (1008, "invalid token")

    run(go())


def test_refresh_without_token_is_a_bad_request(shared_server, shared_dir):
    srv = shared_server

    async def go() -> None:
        async with srv.connect(issue(shared_dir, unique_sub("refresh-none"))) as ws:
            await welcome(ws)
            reply = await request(ws, {"type": "refresh", "id": 7})
            assert reply["type"] == "error" and reply["code"] == "bad_request", reply
            assert reply.get("id") == 7
            assert await request(ws, {"type": "ping"}) == PONG

    run(go())


# == JWK Set reloads ========================================================================


def problems(lines: list[str]) -> list[str]:
    """Log lines at warning level or above (text format: an ISO 8601 UTC timestamp, then the level name)."""
    return [line for line in lines if re.match(r"^\S+Z\s+(WARNING|ERROR|CRITICAL)\b", line)]


def reported(srv: Server, mark: int) -> None:
    """Wait for the first problem line after ``mark``; then watch two more polls (1 s), in which a
    server that repeated itself on every poll would log again."""
    wait_for(lambda: problems(srv.log()[mark:].splitlines()), 10, "a line about the bad file")
    time.sleep(1.0)  # an observation window for a repeat, not a synchronisation


def test_corrupt_jwks_keeps_the_last_good_keys(fresh_dir, start):
    srv = start(fresh_dir)
    jwks = fresh_dir / "jwks.json"
    token = issue(fresh_dir, unique_sub("corrupt"))
    kid1 = header(token)["kid"]
    run(welcomed(srv, token))
    mark = len(srv.log())

    # 1. invalid JSON, replaced atomically as an editor or a config tool would
    tmp = jwks.with_name(".jwks.json.test")
    tmp.write_text('{"keys": [ {"kty": "OKP", ')
    os.replace(tmp, jwks)
    reported(srv, mark)
    run(welcomed(srv, token))
    assert {k["kid"] for k in served_jwks(srv)} == {kid1}
    lines = srv.log()[mark:].splitlines()
    about = problems(lines)
    assert len(about) == 1, f"expected one clear line about the bad file, got: {lines}"
    assert str(jwks) in about[0], about[0]

    # 2. truncated in place
    mark = len(srv.log())
    with open(jwks, "r+b") as fh:
        fh.truncate(0)
    reported(srv, mark)
    run(welcomed(srv, token))
    lines = srv.log()[mark:].splitlines()
    about = problems(lines)
    assert len(about) == 1 and str(jwks) in about[0], lines

    # 3. a good file again: `keys rotate` writes the public set from the private one
    kid2 = cli(fresh_dir, "keys", "rotate").stdout.strip()
    new = issue(fresh_dir, unique_sub("corrupt"))
    run(eventually_welcomed(srv, new))
    run(welcomed(srv, token))
    assert {k["kid"] for k in served_jwks(srv)} == {kid1, kid2}
    assert "Traceback" not in srv.log()


def test_sighup_forces_a_reload(fresh_dir, start):
    sub_old, sub_new = unique_sub("hup-old"), unique_sub("hup-new")
    old = issue(fresh_dir, sub_old)
    kid1 = header(old)["kid"]
    kid2 = cli(fresh_dir, "keys", "rotate").stdout.strip()
    new = issue(fresh_dir, sub_new)
    srv = start(fresh_dir)
    jwks = fresh_dir / "jwks.json"

    async def go() -> None:
        async with srv.connect(old) as ws_old, srv.connect(new) as ws_new:
            await welcome(ws_old)
            await welcome(ws_new)
            # Drop kid1 from the public set by hand, invisibly to a stat-based poll.
            document = json.loads(jwks.read_text())
            document["keys"] = [k for k in document["keys"] if k["kid"] != kid1]
            rewrite_invisibly(jwks, document)
            await asyncio.sleep(1.2)
            if await refusal_or_welcome(srv, old) != "welcome":
                pytest.skip("the poll already saw an in-place edit with unchanged stat; SIGHUP cannot be isolated")
            watcher = asyncio.create_task(watch_close(ws_old))
            srv.proc.send_signal(signal.SIGHUP)
            sent = time.time()
            code, reason, at = await watcher
            assert (code, reason) == (1008, "token revoked")
            assert at - sent <= REVOKE_WITHIN
            assert srv.proc.poll() is None, "SIGHUP must not stop the server"
            assert await request(ws_new, {"type": "ping"}) == PONG
        assert await refusal(srv, old) == (1008, "invalid token")
        await welcomed(srv, new)

    run(go())
    assert {k["kid"] for k in served_jwks(srv)} == {kid2}


async def refusal_or_welcome(srv: Server, token: str) -> str:
    async with srv.connect(token) as ws:
        try:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        except Exception:
            return "refused"
        return "welcome" if frame.get("type") == "welcome" else "other"


# == the cron script ========================================================================


def rotate_script(path: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "rotate_keys.py"), *args],
        cwd=path, env=base_env(path), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_rotate_keys_script(fresh_dir, start):
    srv = start(fresh_dir)
    old = issue(fresh_dir, unique_sub("cron"))
    kid1 = header(old)["kid"]

    async def go() -> None:
        async with srv.connect(old) as ws:
            await welcome(ws)
            out = rotate_script(fresh_dir).stdout.splitlines()
            assert out[0].startswith("active: ") and len(out) == 1, out  # nothing old enough to retire
            kid2 = out[0].split(": ", 1)[1]
            assert key_statuses(fresh_dir) == {kid1: "previous", kid2: "active"}
            await asyncio.to_thread(wait_for_served_kids, srv, {kid1, kid2})
            assert await request(ws, {"type": "ping"}) == PONG

            result, returned, closes = await run_while_watching(lambda: rotate_script(fresh_dir, "--keep", "0"), [ws])
            assert_revoked_in_time(closes, returned)
            out = result.stdout.splitlines()
            assert out[0].startswith("active: "), out
            kid3 = out[0].split(": ", 1)[1]
            assert sorted(out[1:]) == sorted([f"retired: {kid1}", f"retired: {kid2}"]), out
        assert key_statuses(fresh_dir) == {kid1: "retired", kid2: "retired", kid3: "active"}
        assert [k["kid"] for k in json.loads((fresh_dir / "jwks.json").read_text())["keys"]] == [kid3]
        assert await refusal(srv, old) == (1008, "invalid token")
        new = issue(fresh_dir, unique_sub("cron"))
        assert header(new)["kid"] == kid3
        await welcomed(srv, new)

    run(go())


# == identity provider: rotation, once the 30 s since the start-up fetch have passed ==========


def test_idp_rotation_is_picked_up_on_the_first_unknown_kid(idp_setup):
    idp, srv = idp_setup
    # The refetch guard counts from the last fetch, the start-up one included: wait it out.
    time.sleep(max(0.0, idp.fetches[-1] + 31.0 - time.monotonic()))
    before = idp.count()
    idp.add_key("idp-2")
    hello = run(welcomed(srv, idp.sign("idp-2", "idp-rotated")))
    assert hello["sub"] == "idp-rotated"
    assert idp.count() == before + 1, "one refetch for the new kid"
    run(welcomed(srv, idp.sign("idp-1", "idp-user")))  # the previous IdP key still verifies
    assert {"idp-1", "idp-2"} <= {k["kid"] for k in served_jwks(srv)}

    run(forged_kid_storm(srv))  # right after a refetch: the guard holds
    assert idp.count() == before + 1, f"forged kids right after a refetch caused {idp.count() - before - 1} more fetches"
    assert "Traceback" not in srv.log()
