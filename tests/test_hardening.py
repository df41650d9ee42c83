"""Hardening, over real processes and the real wire: SPEC §2 (config errors), §3 (origin, throttle,
connection cap, log hygiene), §4 (shutdown), §7 (TLS of ``secure-ws serve``) and §8 (HTTP routes).

TLS probes use the stdlib ``ssl`` client. Every "refused" probe is first run against a deliberately
permissive TLS server in this process (same certificate, every protocol and suite enabled), so a
refusal by ``secure-ws serve`` can only come from its context, never from a client that could not
have negotiated that protocol or suite in the first place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import json
import signal
import socket
import ssl
import threading
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets
from helpers import (
    Serve,
    Server,
    base_env,
    cli,
    closed_with,
    free_port,
    metric,
    refusal,
    request,
    run,
    scrape,
    signing_key,
    unique_sub,
    welcome,
)

MOZILLA_TLS12_SUITES = {
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
}


# -- `secure-ws serve` as a subprocess ------------------------------------------------------


@pytest.fixture(scope="module")
def serve(keydir: Path):
    srv = Serve(keydir, base_env(keydir)).start()
    yield srv
    srv.stop()


@pytest.fixture
def make_serve(make_server):
    return partial(make_server, kind=Serve)


# -- TLS probing helpers --------------------------------------------------------------------


def client_context(
    keydir: Path | None = None,
    *,
    min_version: ssl.TLSVersion | None = None,
    max_version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    cert: tuple[Path, Path] | None = None,
) -> ssl.SSLContext:
    """A client context; verifies the dev CA when ``keydir`` is given, else verifies nothing (a probe)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1/TLSv1_1 are deprecated in ssl
        if keydir is not None:
            ctx = ssl.create_default_context(cafile=str(keydir / "ca.crt"))
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if min_version is not None:
            ctx.minimum_version = min_version
        if max_version is not None:
            ctx.maximum_version = max_version
        if ciphers is not None:
            ctx.set_ciphers(ciphers)  # ssl.SSLError if this OpenSSL cannot offer any of them
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def handshake(port: int, ctx: ssl.SSLContext) -> tuple[str, str]:
    """Complete a TLS handshake with 127.0.0.1:port; (protocol version, cipher) or an exception."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            version, cipher = tls.version(), tls.cipher()
            assert version is not None and cipher is not None
            return version, cipher[0]


def https_get_raw(port: int, ctx: ssl.SSLContext, path: str = "/healthz") -> bytes:
    """A raw HTTP/1.1 GET over TLS; the whole response (the server closes after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return data


def refused_at_tls(port: int, ctx: ssl.SSLContext) -> str:
    """The error text when the server refuses the TLS handshake; fails the test if it completes."""
    try:
        version, cipher = handshake(port, ctx)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        return str(exc)
    raise AssertionError(f"the server accepted {version} with {cipher}")


@pytest.fixture(scope="module")
def permissive_tls(keydir: Path):
    """A TLS server that accepts anything this OpenSSL can do (TLS 1.0+, CBC, NULL, anonymous): the control."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    ctx.load_cert_chain(str(keydir / "server.crt"), str(keydir / "server.key"))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(5)
            with contextlib.suppress(Exception), ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
            conn.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(2)
    listener.close()


# (id, min version, max version, cipher string) of clients that secure-ws serve must refuse
LEGACY_CLIENTS = [
    ("tls1.0", ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1, "ALL:@SECLEVEL=0"),
    ("tls1.1", ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1, "ALL:@SECLEVEL=0"),
    ("cbc-sha256", None, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384"),
    ("cbc-sha1", None, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA"),
    ("every-non-aead-suite", None, ssl.TLSVersion.TLSv1_2, "ALL:COMPLEMENTOFALL:!AESGCM:!CHACHA20:@SECLEVEL=0"),
    ("null-cipher", None, ssl.TLSVersion.TLSv1_2, "eNULL:@SECLEVEL=0"),
    ("anonymous", None, ssl.TLSVersion.TLSv1_2, "aNULL:@SECLEVEL=0"),
    ("rc4", None, ssl.TLSVersion.TLSv1_2, "RC4:@SECLEVEL=0"),
]


@pytest.mark.parametrize("name,min_v,max_v,ciphers", LEGACY_CLIENTS, ids=[c[0] for c in LEGACY_CLIENTS])
def test_serve_refuses_legacy_tls(serve, permissive_tls, name, min_v, max_v, ciphers):
    try:
        ctx = client_context(min_version=min_v, max_version=max_v, ciphers=ciphers)
    except ssl.SSLError:
        pytest.skip(f"this OpenSSL ({ssl.OPENSSL_VERSION}) cannot even offer {ciphers}")
    # Control: this very client does negotiate with a server that allows it.
    version, cipher = handshake(permissive_tls, ctx)
    if name.startswith("tls1."):
        assert version in ("TLSv1", "TLSv1.1"), version
    else:
        assert version == "TLSv1.2" and cipher not in MOZILLA_TLS12_SUITES, (version, cipher)
    refused_at_tls(serve.port, ctx)
    # and the refusal did no harm: a modern client still gets through
    assert https_get_raw(serve.port, client_context(serve.keydir)).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    "cipher", ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"]
)
def test_serve_accepts_tls12_with_mozilla_aead_suites(serve, cipher):
    ctx = client_context(serve.keydir, max_version=ssl.TLSVersion.TLSv1_2, ciphers=cipher)
    assert handshake(serve.port, ctx) == ("TLSv1.2", cipher)


def test_serve_picks_a_mozilla_suite_when_offered_everything(serve):
    ctx = client_context(max_version=ssl.TLSVersion.TLSv1_2, ciphers="ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    version, cipher = handshake(serve.port, ctx)
    assert version == "TLSv1.2" and cipher in MOZILLA_TLS12_SUITES


def test_serve_accepts_tls13(serve):
    ctx = client_context(serve.keydir, min_version=ssl.TLSVersion.TLSv1_3)
    version, cipher = handshake(serve.port, ctx)
    assert version == "TLSv1.3"
    assert https_get_raw(serve.port, ctx).startswith(b"HTTP/1.1 200")


def test_serve_min_version_13_refuses_tls12(serve, make_serve):
    tls12 = client_context(serve.keydir, max_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    assert handshake(serve.port, tls12)[0] == "TLSv1.2"  # control: the default (1.2) server accepts it
    strict = make_serve(SECURE_WS_TLS_MIN_VERSION="1.3")
    refused_at_tls(strict.port, tls12)
    assert handshake(strict.port, client_context(serve.keydir))[0] == "TLSv1.3"


def test_wss_through_serve(serve, issue):
    sub = unique_sub()

    async def go():
        async with serve.connect(issue(sub=sub), "subprotocol") as ws:
            assert (await welcome(ws))["sub"] == sub
            assert await request(ws, {"type": "ping", "id": 7}) == {"type": "pong", "id": 7}
        assert await refusal(serve, None) == (1008, "missing token")

    run(go())


def test_serve_http_routes(serve):
    status, _, body = serve.get("/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})


# -- slowloris -------------------------------------------------------------------------------

SLOW_DEADLINE = 10.0  # secure_ws.uvicorn.http_protocol.REQUEST_HEAD_TIMEOUT, as promised to operators


def _slow_client(port: int, keydir: Path, mode: str, watch: float) -> dict[str, Any]:
    """Open TLS, maybe complete one request, then send a partial request head (and trickle more of it).

    Returns when the server closes the connection or after ``watch`` seconds, with the elapsed time
    since the partial head started and any bytes the server sent meanwhile.
    """
    ctx = client_context(keydir)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    try:
        if mode.startswith("keepalive"):
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            first = b""
            while b'{"status":"ok"}' not in first:
                chunk = tls.recv(4096)
                assert chunk, "the first (complete) request got no response"
                first += chunk
        started = time.monotonic()
        if mode != "idle":
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        tls.settimeout(0.5)
        received, i = b"", 0
        while (elapsed := time.monotonic() - started) < watch:
            try:
                chunk = tls.recv(4096)
            except TimeoutError:
                if mode.endswith("trickle"):
                    try:
                        tls.sendall(b"X-Slow-%d: y\r\n" % i)  # one header line every half second, never the blank line
                    except OSError:
                        return {"closed": True, "after": time.monotonic() - started, "received": received}
                    i += 1
                continue
            except (ssl.SSLError, ConnectionError):
                return {"closed": True, "after": time.monotonic() - started, "received": received}
            if not chunk:
                return {"closed": True, "after": time.monotonic() - started, "received": received}
            received += chunk
        return {"closed": False, "after": elapsed, "received": received}
    finally:
        with contextlib.suppress(OSError):
            tls.close()


@pytest.fixture(scope="module", params=["serve", "uvicorn"])
def slow_clients(request, keydir):
    """All slow clients run at once against one server of each entry point, so the ~10 s they take is
    paid once per entry point."""
    srv = (Serve if request.param == "serve" else Server)(keydir, base_env(keydir)).start()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=5)
    futures = {
        mode: pool.submit(_slow_client, srv.port, srv.keydir, mode, SLOW_DEADLINE + 8)
        for mode in ("idle", "silent", "trickle", "keepalive-silent", "keepalive-trickle")
    }
    yield srv, futures
    pool.shutdown(wait=True)
    srv.stop()


def test_slowloris_first_request_head_is_cut_after_10s(slow_clients):
    """A TLS connection that sends nothing, or a partial head and then nothing or a trickle, is cut at
    10 s by both entry points (plain uvicorn held them past its 65 s)."""
    srv, slow_clients = slow_clients
    # control: a prompt request on a fresh connection is answered (the guard does not hit normal clients)
    assert https_get_raw(srv.port, client_context(srv.keydir)).startswith(b"HTTP/1.1 200")
    for mode in ("idle", "silent", "trickle"):
        result = slow_clients[mode].result(timeout=30)
        assert result["closed"], f"{mode}: still open {result['after']:.1f}s after a partial request head"
        assert SLOW_DEADLINE - 1.5 <= result["after"] <= SLOW_DEADLINE + 2.5, (mode, result)
        assert result["received"] == b"", (mode, result)


def test_slowloris_on_a_kept_alive_connection_is_cut_too(slow_clients):
    """After one complete request, a second request head trickled forever must not hold the connection."""
    srv, slow_clients = slow_clients
    for mode in ("keepalive-silent", "keepalive-trickle"):
        result = slow_clients[mode].result(timeout=30)
        assert result["closed"], (
            f"{mode}: still open {result['after']:.1f}s after a partial second request head "
            f"(only the first request of a connection has a deadline)"
        )
        assert result["after"] <= SLOW_DEADLINE + 2.5, (mode, result)


# -- mutual TLS ---------------------------------------------------------------------------------


def _ca(common_name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _client_cert(ca_cert, ca_key, common_name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _write_pem(folder: Path, stem: str, cert, key=None) -> Path:
    from cryptography.hazmat.primitives import serialization

    (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        (folder / f"{stem}.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    return folder / f"{stem}.crt"


@pytest.fixture(scope="module")
def client_pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("client-pki")
    ca_cert, ca_key = _ca("clients CA")
    _write_pem(folder, "clients-ca", ca_cert)
    cert, key = _client_cert(ca_cert, ca_key, "client-1")
    _write_pem(folder, "client", cert, key)
    other_ca, other_key = _ca("someone else's CA")
    cert, key = _client_cert(other_ca, other_key, "intruder")
    _write_pem(folder, "intruder", cert, key)
    return folder


def _refused_without_valid_cert(port: int, ctx: ssl.SSLContext) -> None:
    # With TLS 1.3 the client may finish its side of the handshake before the server's alert arrives,
    # so the refusal can surface on the first read instead of in the handshake: no HTTP response either way.
    try:
        data = https_get_raw(port, ctx)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return
    assert not data.startswith(b"HTTP/"), f"answered without a valid client certificate: {data[:60]!r}"


def test_mtls_client_ca(make_serve, client_pki, issue, keydir):
    srv = make_serve(SECURE_WS_TLS_CLIENT_CA=str(client_pki / "clients-ca.crt"))
    with_cert = client_context(keydir, cert=(client_pki / "client.crt", client_pki / "client.key"))
    assert https_get_raw(srv.port, with_cert).startswith(b"HTTP/1.1 200")
    for tls13 in (False, True):
        limit = {} if tls13 else {"max_version": ssl.TLSVersion.TLSv1_2}
        _refused_without_valid_cert(srv.port, client_context(keydir, **limit))
        intruder = client_context(keydir, cert=(client_pki / "intruder.crt", client_pki / "intruder.key"), **limit)
        _refused_without_valid_cert(srv.port, intruder)
    sub = unique_sub()

    async def go():
        url = f"wss://localhost:{srv.port}/ws"
        async with websockets.connect(url, ssl=with_cert, additional_headers={"Authorization": f"Bearer {issue(sub=sub)}"},
                                      open_timeout=10) as ws:
            assert (await welcome(ws))["sub"] == sub
        with pytest.raises((OSError, websockets.InvalidHandshake, websockets.ConnectionClosed, EOFError)):
            async with websockets.connect(url, ssl=client_context(keydir), open_timeout=10,
                                          additional_headers={"Authorization": f"Bearer {issue(sub=sub)}"}) as ws:
                await ws.recv()

    run(go())


# -- start-up errors of `secure-ws serve` --------------------------------------------------------


@pytest.mark.parametrize(
    "variable,value",
    [
        ("SECURE_WS_TLS_CERTFILE", "missing.crt"),
        ("SECURE_WS_TLS_KEYFILE", "missing.key"),
        ("SECURE_WS_TLS_CERTFILE", "garbage.pem"),
        ("SECURE_WS_TLS_KEYFILE", "ca.key"),  # a key that does not match the certificate
        ("SECURE_WS_TLS_CLIENT_CA", "missing-ca.crt"),
        ("SECURE_WS_TLS_CLIENT_CA", "garbage.pem"),
        ("SECURE_WS_TLS_MIN_VERSION", "1.1"),
    ],
    ids=["missing-cert", "missing-key", "garbage-cert", "mismatched-key", "missing-client-ca", "garbage-client-ca",
         "min-version-1.1"],
)
def test_serve_config_error_is_one_line_naming_the_variable(keydir, variable, value):
    (keydir / "garbage.pem").write_text("this is not PEM\n")
    if value.endswith((".crt", ".key", ".pem")):
        value = str(keydir / value)
    port = str(free_port())
    result = cli(keydir, "serve", "--port", port, env=base_env(keydir, **{variable: value}), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("secure-ws")]
    assert len(errors) == 1 and variable in errors[0], f"expected one line naming {variable}, got:\n{result.stderr}"
    assert not [line for line in result.stderr.splitlines() if line.strip() and "secure_ws.keys" not in line
                and not line.startswith("secure-ws")], result.stderr


# -- Origin allow-list ---------------------------------------------------------------------------------

APP = "https://app.example.com"


@pytest.fixture(scope="module")
def origin_server(keydir: Path):
    srv = Server(keydir, base_env(keydir, SECURE_WS_ALLOWED_ORIGINS=APP)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def any_origin_server(keydir: Path):
    srv = Server(keydir, base_env(keydir, SECURE_WS_ALLOWED_ORIGINS="*")).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("transport", ["header", "subprotocol", "query"])
def test_allowed_origin_is_welcomed(origin_server, issue, transport):
    async def go():
        async with origin_server.connect(issue(), transport, origin=APP) as ws:
            await welcome(ws)

    run(go())


def test_no_origin_header_is_welcomed(origin_server, issue):
    async def go():
        async with origin_server.connect(issue()) as ws:
            assert "Origin" not in ws.request.headers
            await welcome(ws)

    run(go())


LOOKALIKES = [
    "https://app.example.com.evil.org",
    "https://evil.org",
    "null",
    "http://app.example.com",
    "https://app.example.com:8443",
    "https://app.example.com:443",  # same origin spelled differently: exact match refuses it (browsers never send it)
    "https://APP.example.com",  # browsers always lower-case the host; exact match refuses anything else
    "https://app.example.com/",
    "https://evil.app.example.com",
    "https://app.example.co",
    "https://xapp.example.com",
    "wss://app.example.com",
]


@pytest.mark.parametrize("origin", LOOKALIKES)
def test_lookalike_origins_are_refused(origin_server, issue, origin):
    assert run(refusal(origin_server, issue(), "subprotocol", origin=origin)) == (1008, "origin not allowed")


def test_origin_set_through_a_raw_header_is_checked_too(origin_server, issue):
    code = run(refusal(origin_server, issue(), headers={"Origin": "https://evil.org"}))
    assert code == (1008, "origin not allowed")


def test_origin_is_checked_before_the_token(origin_server, issue):
    # a refused origin says so even without a token: the page is refused, not the user
    assert run(refusal(origin_server, None, origin="https://evil.org")) == (1008, "origin not allowed")


@pytest.mark.parametrize("origin", ["https://evil.org", "null", "http://localhost:3000", APP])
def test_star_allows_any_origin(any_origin_server, issue, origin):
    async def go():
        async with any_origin_server.connect(issue(), origin=origin) as ws:
            await welcome(ws)

    run(go())


# -- connection cap per sub ------------------------------------------------------------------------


async def _welcomed_within(srv: Server, token: str, seconds: float = 2.0):
    """Connect until welcomed (a released slot may take a moment); return the open connection's context."""
    deadline = time.monotonic() + seconds
    while True:
        cm = srv.connect(token)
        ws = await cm.__aenter__()
        try:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert frame["type"] == "welcome", frame
            return cm, ws
        except websockets.ConnectionClosed as exc:
            await cm.__aexit__(None, None, None)
            assert exc.rcvd is not None and (exc.rcvd.code, exc.rcvd.reason) == (1008, "too many connections"), exc
            if time.monotonic() > deadline:
                raise AssertionError(f"slot not released within {seconds}s") from None
            await asyncio.sleep(0.1)


def test_connection_cap_per_sub(make_server, issue):
    srv = make_server(SECURE_WS_MAX_CONNECTIONS_PER_CLIENT="2")
    sub = unique_sub()

    async def go():
        async with srv.connect(issue(sub=sub)) as a, srv.connect(issue(sub=sub), "query") as b:
            await welcome(a)
            await welcome(b)
            for transport in ("header", "subprotocol", "token"):
                assert await refusal(srv, issue(sub=sub), transport) == (1008, "too many connections")
            async with srv.connect(issue()) as other:  # another sub is not affected
                await welcome(other)
            assert await request(a, {"type": "ping"}) == {"type": "pong"}  # refusals leave the holders alone
            await b.close()
            cm, c = await _welcomed_within(srv, issue(sub=sub))
            try:
                # the refused attempts took no slot and the freed one is taken again: still exactly 2
                assert await refusal(srv, issue(sub=sub)) == (1008, "too many connections")
            finally:
                await cm.__aexit__(None, None, None)

    run(go())


def test_connection_cap_slot_is_released_on_abrupt_disconnect(make_server, issue):
    srv = make_server(SECURE_WS_MAX_CONNECTIONS_PER_CLIENT="1")
    sub = unique_sub()

    async def go():
        cm = srv.connect(issue(sub=sub))
        ws = await cm.__aenter__()
        await welcome(ws)
        assert await refusal(srv, issue(sub=sub)) == (1008, "too many connections")
        ws.transport.abort()  # no close frame, just a dropped TCP connection
        with contextlib.suppress(Exception):
            await cm.__aexit__(None, None, None)
        cm2, _ = await _welcomed_within(srv, issue(sub=sub))
        await cm2.__aexit__(None, None, None)

    run(go())


# -- handshake throttle ------------------------------------------------------------------------------


async def _throttled(srv: Server, token: str | None, **kwargs: Any) -> websockets.InvalidStatus:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with srv.connect(token, **kwargs) as ws:
            await ws.recv()
    return info.value


def _retry_after(exc: websockets.InvalidStatus) -> int:
    response = exc.response
    assert response.status_code == 429, response.status_code
    value = response.headers.get("Retry-After")
    assert value is not None and value.isdigit(), value
    assert 1 <= int(value) <= 60, value
    return int(value)


def test_handshake_throttle_answers_429_with_retry_after(make_server, issue):
    srv = make_server(SECURE_WS_HANDSHAKE_RATE_LIMIT="3/minute")

    async def go():
        for _ in range(3):
            async with srv.connect(issue()) as ws:
                await welcome(ws)
        exc = await _throttled(srv, issue())
        _retry_after(exc)
        assert b"eyJ" not in (exc.response.body or b"")
        # still throttled, and other IPs are not (127.0.0.2 is loopback too)
        _retry_after(await _throttled(srv, issue(), transport="query"))
        async with srv.connect(issue(), local_addr=("127.0.0.2", 0)) as ws:
            await welcome(ws)

    run(go())
    status, _, _ = srv.get("/healthz")  # HTTP routes are not handshakes
    assert status == 200
    assert 'secure_ws_handshakes_total{result="throttled"} 2.0' in srv.get("/metrics")[2].decode()


def test_handshake_throttle_counts_refused_attempts(make_server, issue):
    srv = make_server(SECURE_WS_HANDSHAKE_RATE_LIMIT="3/minute")

    async def go():
        assert await refusal(srv, None) == (1008, "missing token")
        assert await refusal(srv, "not-a-token") == (1008, "invalid token")
        assert await refusal(srv, issue(aud="someone-else")) == (1008, "invalid token")
        _retry_after(await _throttled(srv, issue()))  # a valid token after three failures is still throttled

    run(go())


# -- HTTP routes and metrics -----------------------------------------------------------------------------


def test_metrics_exposition(server, issue):
    before = scrape(server)
    body = server.get("/metrics")[2].decode()
    for name in ("secure_ws_connections_active", "secure_ws_handshakes_total", "secure_ws_messages_total",
                 "secure_ws_rate_limited_total", "secure_ws_closes_total", "secure_ws_handshake_seconds",
                 "secure_ws_frame_seconds"):
        assert f"# TYPE {name.removesuffix('_total')} " in body or f"# TYPE {name} " in body, name

    async def go():
        async with server.connect(issue()) as ws:
            await welcome(ws)
            open_now = metric(scrape(server), "secure_ws_connections_active")
            assert open_now >= 1
            for i in range(5):
                assert (await request(ws, {"type": "ping", "id": i}))["type"] == "pong"
        deadline = time.monotonic() + 2
        while metric(scrape(server), "secure_ws_connections_active") > open_now - 1:
            assert time.monotonic() < deadline, "connections_active did not go down after a close"
            await asyncio.sleep(0.05)
        assert await refusal(server, None) == (1008, "missing token")
        assert await refusal(server, "x.y.z") == (1008, "invalid token")
        async with server.connect(issue()) as ws:  # rate limit: 20/second by default
            await welcome(ws)
            for _ in range(25):  # 20 pass, 5 are refused (fewer than the 10 in a row that close)
                await ws.send('{"type":"ping"}')
            replies = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(25)]
            assert any(r.get("code") == "rate_limited" for r in replies)
            await ws.send(b"\x00binary")
            assert await closed_with(ws) == (1003, "binary frames are not accepted")

    run(go())
    after = scrape(server)

    def grew(name: str, by: float = 1, **labels: str) -> None:
        delta = metric(after, name, **labels) - metric(before, name, **labels)
        assert delta >= by, f"{name}{labels} grew by {delta}, expected at least {by}"

    grew("secure_ws_handshakes_total", 2, result="accepted")
    grew("secure_ws_handshakes_total", 1, result="missing_token")
    grew("secure_ws_handshakes_total", 1, result="invalid_token")
    grew("secure_ws_messages_total", 31)
    grew("secure_ws_rate_limited_total", 1)
    grew("secure_ws_closes_total", 1, code="1003", reason="binary_frames_are_not_accepted")
    grew("secure_ws_handshake_seconds_count", 2)
    grew("secure_ws_frame_seconds_count", 1)


def test_healthz_readyz_jwks(server, keydir):
    status, headers, body = server.get("/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert headers["content-type"].startswith("application/json")
    status, _, body = server.get("/readyz")
    assert (status, json.loads(body)["status"]) == (200, "ok")
    status, _, body = server.get("/.well-known/jwks.json")
    assert status == 200
    keys = json.loads(body)["keys"]
    kid, _, alg = signing_key(keydir)
    assert any(k.get("kid") == kid and k.get("alg") == alg for k in keys), keys
    for key in keys:
        assert "kty" in key
        leaked = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"} & set(key)
        assert not leaked, f"private members {leaked} published for {key.get('kid')}"


# -- log hygiene ---------------------------------------------------------------------------------------


def _bad_signature(token: str) -> str:
    head, payload, sig = token.split(".")
    middle = len(sig) // 2
    flipped = "A" if sig[middle] != "A" else "B"
    return f"{head}.{payload}.{sig[:middle]}{flipped}{sig[middle + 1:]}"


def _secrets_of(tokens: list[str]) -> set[str]:
    """Every token, and its payload and signature parts (the header part is the same for every token)."""
    found = set(tokens)
    for token in tokens:
        parts = token.split(".")
        found.update(p for p in parts[1:] if len(p) >= 16)
    return found


async def _exercise_tokens(srv: Server, issue, keydir: Path) -> list[str]:
    """Present tokens in every way a client can, accepted and refused; return them all."""
    used: list[str] = []

    def keep(token: str) -> str:
        used.append(token)
        return token

    sub = unique_sub("logs")
    for transport in ("query", "token", "subprotocol", "header"):
        async with srv.connect(keep(issue(sub=sub)), transport) as ws:
            await welcome(ws)
            reply = await request(ws, {"type": "refresh", "token": keep(issue(sub=sub))})
            assert reply["type"] == "refreshed", reply
            await request(ws, {"type": "echo", "data": "x"})
    async with srv.connect(keep(issue(sub=sub)), "query") as ws:  # refresh with a forged token closes
        await welcome(ws)
        await ws.send(json.dumps({"type": "refresh", "token": keep(_bad_signature(issue(sub=sub)))}))
        assert await closed_with(ws) == (1008, "invalid token")
    async with srv.connect(keep(issue(sub=sub)), "header") as ws:  # refresh with another sub's token closes
        await welcome(ws)
        await ws.send(json.dumps({"type": "refresh", "token": keep(issue())}))
        assert await closed_with(ws) == (1008, "invalid token")

    assert await refusal(srv, keep(issue(ttl=-300)), "query") == (1008, "token expired")
    assert await refusal(srv, keep(issue(ttl=-300)), "token") == (1008, "token expired")
    assert await refusal(srv, keep(_bad_signature(issue())), "token") == (1008, "invalid token")
    assert await refusal(srv, keep(_bad_signature(issue())), "subprotocol") == (1008, "invalid token")
    assert await refusal(srv, keep(issue(aud="other")), "header") == (1008, "invalid token")
    async with srv.connect(keep(issue(pad="x" * 5000)), "subprotocol") as ws:  # a large token, still welcomed
        await welcome(ws)
        await ws.send(json.dumps({"type": "refresh", "token": keep(issue(sub=sub, pad="x" * 9000))}))  # over 8192 chars
        assert await closed_with(ws) == (1008, "invalid token")
    a, b = keep(issue()), keep(issue())
    assert await refusal(srv, None, query=f"access_token={a}&token={b}") == (1008, "ambiguous credentials")
    # percent-encoded dots: still the same token once the query string is decoded
    encoded = keep(issue())
    assert await refusal(srv, None, query=f"token={encoded.replace('.', '%2E')}&access_token={keep(issue())}") == (
        1008, "ambiguous credentials")

    revoked = keep(issue())
    cli(keydir, "token", "revoke", "--jti", jwt.decode(revoked, options={"verify_signature": False})["jti"])
    deadline = time.monotonic() + 4
    while (await refusal_or_welcome(srv, revoked)) != (1008, "token revoked"):
        assert time.monotonic() < deadline, "revocation not picked up"
        await asyncio.sleep(0.2)

    # a token on other paths: a refused WebSocket path, and plain HTTP routes with and without a query
    with pytest.raises(websockets.InvalidStatus):
        async with srv.connect(keep(issue()), "query", path="/elsewhere"):
            pass
    for path in (f"/healthz?access_token={keep(issue())}", f"/metrics?token={keep(issue())}",
                 f"/{keep(issue())}", f"/healthz?x=1&Access_Token={keep(issue())}"):
        await asyncio.to_thread(srv.get, path)
    return used


async def refusal_or_welcome(srv: Server, token: str) -> tuple[int, str] | str:
    async with srv.connect(token) as ws:
        try:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code, exc.rcvd.reason
        return frame["type"]


def _assert_no_token(log: str, tokens: list[str]) -> None:
    assert "handshake refused" in log and "[redacted" in log, "the log does not show the exercised handshakes"
    assert "token expired" in log and "token revoked" in log
    for secret in _secrets_of(tokens):
        assert secret not in log, f"a token (or part of one) is in the server log: …{secret[-24:]}"


@pytest.mark.parametrize("uvicorn_args", [(), ("--log-level", "trace")], ids=["info", "trace"])
def test_no_token_in_the_log(make_server, issue, keydir, uvicorn_args):
    srv = make_server(uvicorn_args=uvicorn_args)
    tokens = run(_exercise_tokens(srv, issue, keydir))
    assert srv.stop() in (0, -signal.SIGTERM)
    _assert_no_token(srv.log(), tokens)


def test_no_token_in_the_log_of_serve(make_serve, issue, keydir):
    srv = make_serve()
    tokens = run(_exercise_tokens(srv, issue, keydir))
    srv.stop()
    _assert_no_token(srv.log(), tokens)


def test_json_log_lines_are_json_and_carry_no_token(make_server, issue, keydir):
    srv = make_server(SECURE_WS_LOG_FORMAT="json")
    tokens = run(_exercise_tokens(srv, issue, keydir))
    srv.stop()
    log = srv.log()
    _assert_no_token(log, tokens)
    entries = []
    for line in log.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"a log line that is not JSON: {line[:200]!r}") from None
        assert isinstance(entry, dict) and {"ts", "level", "logger", "message"} <= set(entry), line
        entries.append(entry)
    ours = [e for e in entries if e["logger"] in ("secure_ws.handshake", "secure_ws.session")]
    assert ours and all("event" in e for e in ours), [e for e in ours if "event" not in e][:3]
    refused = [e for e in ours if e["event"] == "handshake_refused"]
    assert {e["reason"] for e in refused} >= {"token expired", "invalid token", "ambiguous credentials", "token revoked"}
    assert all(e["close_code"] == 1008 and e["client"] == "127.0.0.1" for e in refused)
    closes = [e for e in ours if e["event"] == "close"]
    assert closes, "no close event logged for the refresh refusals"
    for e in closes:
        assert e["connection_id"] and e["sub"] and e["close_code"] == 1008, e
    assert any(e["logger"].startswith("uvicorn") for e in entries)  # uvicorn's own lines are JSON too


def test_percent_encoded_query_name_does_not_leak_the_token(make_server, issue):
    """The query string is percent-decoded before the token is looked up, so ``%61ccess_toke%6E=`` *is*
    ``access_token=`` to the server: a token presented that way is used, and must be redacted like any other."""
    srv = make_server()
    token = issue()
    name = "".join(f"%{ord(c):02X}" for c in "access_token")
    query = f"{name}={token.replace('.', '%2E')}"

    async def go():
        async with srv.connect(None, query=query) as ws:
            return (await welcome(ws))["type"]

    assert run(go()) == "welcome"  # the server did take it as the token
    srv.stop()
    log = srv.log()
    assert "WebSocket /ws?" in log, "uvicorn did not log the WebSocket request line"
    leaked = [s for s in _secrets_of([token]) if s in log]
    assert not leaked, f"token parts in the log: {[s[-16:] for s in leaked]}"


# -- oversized handshakes -------------------------------------------------------------------------------


def _raw_upgrade(port: int, keydir: Path, *, header: str = "", query: str = "", token: str = "") -> ssl.SSLSocket:
    """Send a WebSocket upgrade request by hand over TLS; return the socket for reading the answer."""
    tls = client_context(keydir).wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                                             server_hostname="localhost")
    lines = [
        f"GET /ws{'?' + query if query else ''} HTTP/1.1", f"Host: localhost:{port}", "Upgrade: websocket",
        "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if header:
        lines.append(f"X-Padding: {header}")
    tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return tls


def _answer_within(tls: ssl.SSLSocket, seconds: float) -> bytes | None:
    """The first bytes the server sends, b"" if it closes; None if it stays silent for ``seconds``."""
    tls.settimeout(seconds)
    try:
        return tls.recv(4096)
    except TimeoutError:
        return None
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        tls.close()


@pytest.mark.parametrize("launcher", ["serve", "uvicorn"])
@pytest.mark.parametrize("where", ["header", "query"])
def test_oversized_handshake_is_answered_not_left_hanging(serve, server, issue, where, launcher):
    """A request line or header over the parser's limit (8 KiB) must get an HTTP error or a close, promptly;
    a handshake left unanswered holds a connection forever (the first-request deadline is already disarmed)."""
    srv = serve if launcher == "serve" else server
    answer = _answer_within(_raw_upgrade(srv.port, srv.keydir, token=issue()), 5)  # control: a normal upgrade
    assert answer is not None and answer.startswith(b"HTTP/1.1 101"), answer
    big = "a" * 9000
    tls = _raw_upgrade(srv.port, srv.keydir, token=issue(), **({"header": big} if where == "header" else {"query": f"x={big}"}))
    answer = _answer_within(tls, 5)
    assert answer is not None, f"no answer in 5 s to a handshake with a 9000-byte {where}: the connection hangs"
    assert answer == b"" or answer.split(b" ", 2)[1][:1] == b"4", answer[:80]
    assert https_get_raw(srv.port, client_context(srv.keydir)).startswith(b"HTTP/1.1 200")  # still serving


@pytest.mark.parametrize("launcher", ["serve", "uvicorn"])
def test_sigterm_with_an_oversized_handshake_in_flight_still_shuts_down_cleanly(make_serve, make_server, issue, keydir,
                                                                                  launcher):
    srv = make_serve() if launcher == "serve" else make_server()
    pending = _raw_upgrade(srv.port, keydir, header="a" * 9000)
    pending.settimeout(2)
    try:
        answered = pending.recv(4096)  # a fixed server answers 431 at once; then the client goes away
    except TimeoutError:
        answered = None  # left hanging: keep it open while the server shuts down
    except (ssl.SSLError, ConnectionError):
        answered = b""
    if answered is not None:
        pending.close()

    async def go():
        async with srv.connect(issue()) as ws:
            await welcome(ws)
            stopping = asyncio.create_task(asyncio.to_thread(srv.stop, signal.SIGTERM, 15.0))
            try:
                code = await closed_with(ws, 15)
            except AssertionError as exc:  # dropped without a close frame
                code = (1006, str(exc))
            return code, await stopping

    try:
        (close_code, reason), exit_code = run(go())
    finally:
        pending.close()
    log = srv.log()
    assert close_code in (1001, 1012), f"live connection got {close_code} {reason!r}; server log:\n{log[-1500:]}"
    assert exit_code in (0, -signal.SIGTERM), (exit_code, log[-1500:])
    assert "Traceback" not in log, log[-3000:]


# -- graceful shutdown ---------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", ["uvicorn", "serve"])
def test_sigterm_closes_live_connections_and_exits(make_server, make_serve, issue, launcher):
    srv = make_server() if launcher == "uvicorn" else make_serve()

    async def go():
        async with srv.connect(issue()) as ws, srv.connect(issue(), "subprotocol") as ws2:
            await welcome(ws)
            await welcome(ws2)
            started = time.monotonic()
            stopping = asyncio.create_task(asyncio.to_thread(srv.stop, signal.SIGTERM, 15.0))
            codes = [await closed_with(ws, 15), await closed_with(ws2, 15)]
            code = await stopping
            return codes, code, time.monotonic() - started

    codes, exit_code, took = run(go())
    for close_code, _ in codes:
        assert close_code in (1001, 1012), codes
    log = srv.log()
    # uvicorn re-raises SIGTERM after a complete graceful shutdown (exit status -15 / 143 in a shell);
    # SIGKILL after the 15 s grace would be -9 and would miss the lines below.
    assert exit_code in (0, -signal.SIGTERM), (exit_code, log[-2000:])
    assert took < 15
    assert "Application shutdown complete" in log and "Finished server process" in log, log[-2000:]
    assert "Traceback" not in log, log
