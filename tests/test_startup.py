"""Start-up of both entry points: SIGHUP during start-up, the internal port, and the errors a newcomer meets."""

from __future__ import annotations

import http.server
import os
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Serve, Server, base_env, free_port, wait_for


def _run(srv: Server, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a server that should refuse to start; it must end by itself with its one line."""
    return subprocess.run(srv.argv(), env=srv.env, cwd=srv.keydir, capture_output=True, text=True, timeout=timeout)


# -- SECURE_WS_INTERNAL_PORT equal to the public port ---------------------------------------------------


@pytest.mark.parametrize("kind", [Serve, Server], ids=["secure-ws serve", "uvicorn"])
def test_internal_port_from_the_environment_equal_to_the_public_port_is_refused(keydir, kind):
    """The flag was compared with --port, the variable was not: the public port then served /metrics."""
    port = free_port()
    srv = kind(keydir, base_env(keydir, SECURE_WS_INTERNAL_PORT=str(port)))
    srv.port = port
    result = _run(srv)
    assert result.returncode == 2, result.stderr
    assert "SECURE_WS_INTERNAL_PORT" in result.stderr and "Traceback" not in result.stderr


def test_internal_port_flag_equal_to_the_public_port_is_refused(keydir):
    port = free_port()
    srv = Serve(keydir, base_env(keydir), ("--internal-port", str(port)))
    srv.port = port
    result = _run(srv)
    assert result.returncode == 2 and "SECURE_WS_INTERNAL_PORT" in result.stderr, result.stderr


# -- SIGHUP while starting -----------------------------------------------------------------------------


class _HeldJwks:
    """An HTTPS JWKS endpoint that holds its first request until released: a server fetching it at
    start-up is caught mid-start-up, at a moment the test knows."""

    def __init__(self, keydir: Path) -> None:
        self.body = (keydir / "jwks.json").read_bytes()
        self.asked = threading.Event()
        self.release = threading.Event()
        held = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if not held.asked.is_set():
                    held.asked.set()
                    held.release.wait(30)
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(held.body)))
                self.end_headers()
                self.wfile.write(held.body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(keydir / "server.crt", keydir / "server.key")
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://localhost:{self.httpd.server_address[1]}/jwks"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def held_jwks(keydir: Path) -> Iterator[_HeldJwks]:
    held = _HeldJwks(keydir)
    yield held
    held.close()


@pytest.mark.parametrize("kind", [Serve, Server], ids=["secure-ws serve", "uvicorn"])
def test_sighup_during_start_up_does_not_kill_the_server(keydir, held_jwks, kind):
    """`systemctl reload` right after a start: the HUP came before any handler and ended the process."""
    env = base_env(keydir, SECURE_WS_JWKS_URL=held_jwks.url, SSL_CERT_FILE=str(keydir / "ca.crt"))
    srv = kind(keydir, env)
    srv._log = open(srv.log_path, "ab")
    srv.proc = subprocess.Popen(srv.argv(), env=env, cwd=keydir, stdout=srv._log, stderr=subprocess.STDOUT)
    try:
        assert held_jwks.asked.wait(30), srv.log()  # the server is reading its keys: well inside its start-up
        for _ in range(3):
            srv.proc.send_signal(signal.SIGHUP)
        time.sleep(0.2)  # not synchronisation: time for a default-action HUP to end the process, if it would
        assert srv.proc.poll() is None, f"the server died of a SIGHUP during start-up ({srv.proc.returncode}):\n{srv.log()}"
        held_jwks.release.set()
        wait_for(lambda: _listening(srv.port), 30, "the server listening")
        assert srv.get("/healthz")[0] == 200
        wait_for(lambda: "SIGHUP: reloading" in srv.log(), 10, "the held HUP answered as a reload once the server runs")
    finally:
        srv.stop()


def _hup_held(pid: int) -> bool:
    """Whether the process blocks or catches SIGHUP (from /proc: its SigBlk and SigCgt masks)."""
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    bit = 1 << (signal.SIGHUP - 1)
    return bool((int(fields["SigBlk"], 16) | int(fields["SigCgt"], 16)) & bit)


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_storm_from_the_first_moment_serve_holds_it(keydir, own_redis, workers):
    """HUPs every few milliseconds from the moment the process holds SIGHUP (its first line) until it
    serves: no gap between that and the server's own handlers (the supervisor's, with workers)."""
    env = base_env(keydir)
    if workers > 1:
        env["SECURE_WS_STORAGE_URL"] = own_redis().url
    srv = Serve(keydir, env, ("--workers", str(workers)))
    srv._log = open(srv.log_path, "ab")
    srv.proc = subprocess.Popen(srv.argv(), env=env, cwd=keydir, stdout=srv._log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: srv.proc.poll() is not None or _hup_held(srv.proc.pid), 10, "SIGHUP held")
        sent = 0
        deadline = time.monotonic() + 40
        while not _listening(srv.port) and srv.proc.poll() is None and time.monotonic() < deadline:
            os.kill(srv.proc.pid, signal.SIGHUP)
            sent += 1
            time.sleep(0.005)
        assert srv.proc.poll() is None, f"serve died after {sent} HUPs ({srv.proc.returncode}):\n{srv.log()}"
        assert sent > 10
        assert srv.get("/healthz")[0] == 200
    finally:
        srv.stop()
