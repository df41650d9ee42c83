"""``secure-ws serve MODULE:ATTR`` and ``secure-ws dev MODULE:ATTR``: an application, imported from the working
directory, served with everything ``serve`` gives the built-in app (the hardened TLS context, SIGHUP forwarded to
the workers, exit code 2 on a mistake instead of a restart loop). Real processes, real TLS, real Redis.
"""

from __future__ import annotations

import json
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import ServeApp, Server, base_env, free_port, recv_json, request, run, wait_for, welcome
from test_hardening import client_context, handshake
from test_operations import error_lines, run_to_exit
from test_streams import until_terminal

APP = '''
from secure_ws import SecureWS

api = SecureWS()
helper = 42


@api.handler("hello")
async def hello(ctx, data):
    return "hello " + ctx.sub


@api.stream("countdown")
async def countdown(ctx, data):
    for i in range(data, 0, -1):
        yield i
'''


@pytest.fixture
def here(tmp_path: Path) -> Path:
    """A working directory holding the application module ``here_app.py``, and nothing on PYTHONPATH for it."""
    (tmp_path / "here_app.py").write_text(APP)
    return tmp_path


def serving(keydir: Path, cwd: Path, target: str, *args: str, command: str = "serve", **env: str) -> Server:
    srv = ServeApp(keydir, base_env(keydir, **env), app=target, uvicorn_args=args, app_dir=cwd / "nowhere")
    srv.cwd = cwd
    if command == "dev":
        srv.argv = lambda: [sys.executable, "-m", "secure_ws", "dev", target, "--port", str(srv.port)]  # type: ignore[method-assign]
    return srv.start()


async def answers(srv: Server, token: str) -> None:
    async with srv.connect(token) as ws:
        hello = await welcome(ws)
        assert (await request(ws, {"type": "hello", "id": 1})) == {"type": "result", "id": 1, "data": f"hello {hello['sub']}"}
        await ws.send(json.dumps({"type": "countdown", "id": 2, "data": 3}))
        assert await until_terminal(ws, 2) == ([3, 2, 1], {"type": "result", "id": 2, "data": {"chunks": 3}})


@pytest.mark.parametrize("target", ["here_app:api", "here_app:api.app"])
def test_serve_runs_an_application_from_the_working_directory_with_hardened_tls(keydir: Path, here: Path, issue: Any, target: str) -> None:
    srv = serving(keydir, here, target)
    try:
        run(answers(srv, issue()))
        # The hardened context: a TLS 1.2 client offering only CBC suites is refused (OpenSSL's defaults take it).
        cbc = client_context(srv.keydir, max_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            handshake(srv.port, cbc)
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()


def test_dev_serves_an_application(keydir: Path, here: Path, issue: Any) -> None:
    srv = serving(keydir, here, "here_app:api", command="dev")
    try:
        run(answers(srv, issue()))
        assert f"wss://localhost:{srv.port}/ws" in wait_for(lambda: "wss://" in srv.log() and srv.log(), 10, "the banner")
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("no_such_module:api", "cannot import no_such_module"),
        ("here_app:nothing", "here_app has no attribute nothing"),
        ("here_app:helper", "is a int, not a SecureWS or its .app"),
        ("here_app", "use MODULE:ATTR"),
        ("here_app:api;rm", "use MODULE:ATTR"),
    ],
)
def test_a_target_that_cannot_be_served_stops_start_up_with_one_line(keydir: Path, here: Path, target: str, says: str) -> None:
    argv = [sys.executable, "-m", "secure_ws", "serve", target, "--port", str(free_port())]
    code, output, _ = run_to_exit(argv, base_env(keydir), here, within=30)
    assert code == 2, output
    [line] = error_lines(output)
    assert says in line, line
    assert "Traceback" not in output


def test_with_workers_a_configuration_error_exits_2_and_sighup_is_forwarded(keydir: Path, here: Path, issue: Any, own_redis: Any) -> None:
    redis_server = own_redis()
    bad = base_env(keydir, SECURE_WS_STORAGE_URL=redis_server.url, SECURE_WS_STREAM_TIMEOUT="soon")
    code, output, took = run_to_exit(
        [sys.executable, "-m", "secure_ws", "serve", "here_app:api", "--workers", "2", "--port", str(free_port())], bad, here, within=30
    )
    assert code == 2 and "SECURE_WS_STREAM_TIMEOUT" in output and "Traceback" not in output, output

    srv = serving(keydir, here, "here_app:api", "--workers", "2", SECURE_WS_STORAGE_URL=redis_server.url)
    try:
        async def go() -> None:
            async with srv.connect(issue()) as ws:
                await welcome(ws)
                assert srv.proc is not None
                srv.proc.send_signal(signal.SIGHUP)
                wait_for(lambda: "forwarding it to the workers" in srv.log(), 10, "the SIGHUP forwarded")
                assert (await request(ws, {"type": "hello", "id": 1}))["type"] == "result"  # still open, not restarted
                await ws.send(json.dumps({"type": "countdown", "id": 2, "data": 2}))
                assert (await recv_json(ws))["data"] == 2

        run(go())
        assert srv.proc.poll() is None
    finally:
        srv.stop()
