"""SPEC §12 (issue 13): operating it safely — what cannot work is refused at start-up with one line,
nothing fails silently, SIGHUP reloads without a restart, ops commands say what they used.

Everything runs from the outside: the real ``secure-ws``/``python -m secure_ws`` and ``uvicorn``
commands in subprocesses, real workers, real TLS, real Redis (``own_redis``), the real client.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets
from helpers import (
    ROOT,
    Serve,
    Server,
    base_env,
    cli,
    closed_with,
    free_port,
    make_keydir,
    request,
    run,
    unique_sub,
    wait_for,
    welcome,
)

PONG = {"type": "pong"}
ISO_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL)\s")


def run_to_exit(argv: list[str], env: dict[str, str], cwd: Path, within: float) -> tuple[int, str, float]:
    """Run a command that must end by itself within ``within`` s; (exit code, stdout+stderr, seconds)."""
    started = time.monotonic()
    # A session of its own: on timeout the whole group goes, workers included (they hold the pipe open).
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"still running after {within} s:\n{out[-3000:]}") from None
    return proc.returncode, out, time.monotonic() - started


def serve_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "secure_ws", "serve", "--port", str(free_port()), *args]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("secure-ws:")]


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """A deployment folder of its own: dev CA, server certificate, one EdDSA key (ops commands change it)."""
    return make_keydir(tmp_path / "deploy")


def token_of(folder: Path, sub: str | None = None, ttl: str = "15m", *extra: str) -> dict[str, Any]:
    return json.loads(cli(folder, "token", "issue", "--sub", sub or unique_sub(), "--ttl", ttl, "--json", *extra).stdout)


def plain_token(folder: Path) -> str:
    return cli(folder, "token", "issue", "--sub", unique_sub()).stdout.strip()


def keys_on_file(folder: Path) -> list[dict[str, Any]]:
    return json.loads((folder / "signing-keys.json").read_text())["keys"]


# == workers ===================================================================================


def test_serve_refuses_several_workers_with_memory_storage(keydir, tmp_path):
    """Issue 13: `serve --workers 4` with memory:// split pub/sub between workers without a word."""
    code, output, _ = run_to_exit(serve_argv("--workers", "2"), base_env(keydir), tmp_path, within=30)
    assert code == 2, output
    assert "Traceback" not in output
    [line] = output.strip().splitlines()
    assert "SECURE_WS_STORAGE_URL" in line and "memory://" in line and "2 workers" in line, line


def test_plain_uvicorn_workers_with_memory_storage_stop_instead_of_serving(keydir, tmp_path):
    """Under plain `uvicorn --workers 2` the app sees uvicorn's worker count at import: each worker refuses
    with uvicorn's start-up failure code, and uvicorn's supervisor stops instead of restarting them."""
    argv = Server(keydir, {}).argv() + ["--workers", "2"]
    code, output, _ = run_to_exit(argv, base_env(keydir), tmp_path, within=45)
    lines = error_lines(output)
    assert 1 <= len(lines) <= 2 and all("SECURE_WS_STORAGE_URL" in line for line in lines), output
    assert "Traceback" not in output
    assert "died" not in output, "a refused worker must not be restarted"


def test_configuration_error_with_workers_exits_2_at_once(keydir, tmp_path, own_redis):
    """Issue 13: a configuration error with --workers 2 printed 32 error lines in 8 s and never exited."""
    redis_server = own_redis()
    env = base_env(keydir, SECURE_WS_STORAGE_URL=redis_server.url, SECURE_WS_JWKS_FILE=str(tmp_path / "missing.json"))
    code, output, took = run_to_exit(serve_argv("--workers", "2"), env, tmp_path, within=30)
    assert code == 2, output
    assert len(output.strip().splitlines()) == 1, output
    assert "SECURE_WS_JWKS_FILE" in output and "Traceback" not in output
    assert "running" not in output.lower(), "nothing is bound or started before the check"
    assert took < 15, took


def rewrite_in_place(path: Path, document: dict[str, Any]) -> None:
    """Same inode, size and mtime: the file watcher cannot see it, only a forced reload (SIGHUP) can."""
    before = path.stat()
    text = json.dumps(document, indent=2).encode()
    assert len(text) <= before.st_size
    with open(path, "r+b") as fh:
        fh.write(text + b" " * (before.st_size - len(text)))
        fh.flush()
        os.fsync(fh.fileno())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_sighup_with_workers_reloads_every_worker_and_closes_no_connection(fresh, own_redis):
    """Issue 13: `kill -HUP` on the parent with --workers restarted every worker (all clients got 1012)."""
    redis_server = own_redis()
    [old_key] = keys_on_file(fresh)
    old_kid = old_key["kid"]
    old_tokens = [plain_token(fresh) for _ in range(4)]
    cli(fresh, "keys", "rotate")
    new_tokens = [plain_token(fresh) for _ in range(6)]
    srv = Serve(fresh, base_env(fresh, SECURE_WS_STORAGE_URL=redis_server.url), ("--workers", "2")).start()
    jwks = fresh / "jwks.json"
    try:
        async def go() -> None:
            async with _connections(srv, new_tokens) as keep, _connections(srv, old_tokens) as dropped:
                document = json.loads(jwks.read_text())
                document["keys"] = [k for k in document["keys"] if k["kid"] != old_kid]
                rewrite_in_place(jwks, document)
                closes = [asyncio.create_task(closed_with(ws, timeout=10)) for ws in dropped]
                srv.proc.send_signal(signal.SIGHUP)
                # Every connection of the dropped key, whichever worker holds it, is closed by its worker's reload …
                assert [await c for c in closes] == [(1008, "token revoked")] * len(dropped)
                # … and every other connection is still open on the same worker process.
                for ws in keep:
                    assert await request(ws, {"type": "ping"}) == PONG
            for token in old_tokens * 2:  # new handshakes, spread over both workers: all see the reload
                async with srv.connect(token) as ws:
                    assert await closed_with(ws) == (1008, "invalid token")

        run(go())
        assert srv.proc.poll() is None
        log = srv.log()
        assert "1012" not in log and "Terminated child process" not in log, log[-3000:]
        assert log.count("SIGHUP: reloading") == 2, log[-3000:]  # once in each worker
    finally:
        srv.stop()


class _connections:
    """Open, welcomed connections for every token; all closed on exit."""

    def __init__(self, srv: Server, tokens: list[str]) -> None:
        self.srv, self.tokens, self.open = srv, tokens, []

    async def __aenter__(self) -> list[Any]:
        for token in self.tokens:
            ws = await self.srv.connect(token).__aenter__()
            self.open.append(ws)
            await welcome(ws)
        return self.open

    async def __aexit__(self, *exc: object) -> None:
        for ws in self.open:
            await ws.close()


# == ops commands: what they used, --json, --help, --version ======================================


def test_ops_commands_say_which_storage_and_files_they_used(fresh, own_redis):
    """Issue 13: `token revoke` without the server's environment printed success and did nothing visible."""
    result = cli(fresh, "token", "revoke", "--sub", unique_sub())
    revocations = str(fresh / "revocations.json")
    assert "memory://" in result.stderr and f"wrote {revocations}" in result.stderr and "poll" in result.stderr, result.stderr
    redis_server = own_redis()
    url = f"redis://:hunter2secret@127.0.0.1:{redis_server.port}/0"
    result = cli(fresh, "token", "revoke", "--jti", "abc", env=base_env(fresh, SECURE_WS_STORAGE_URL=url))
    assert f"redis://127.0.0.1:{redis_server.port}/0" in result.stderr and revocations in result.stderr, result.stderr
    assert "hunter2secret" not in result.stderr + result.stdout
    for args in (("keys", "list"), ("keys", "rotate"), ("token", "issue", "--sub", "x")):
        result = cli(fresh, *args)
        assert str(fresh / "signing-keys.json") in result.stderr, (args, result.stderr)


def test_every_ops_command_prints_json(fresh, tmp_path):
    certs = json.loads(cli(fresh, "certs", "--out", str(tmp_path / "c"), "--json").stdout)
    assert Path(certs["ca"]).is_file() and certs["hosts"] == ["localhost", "127.0.0.1", "::1"]
    rotated = json.loads(cli(fresh, "keys", "rotate", "--json").stdout)
    assert rotated["alg"] == "EdDSA"
    listed = json.loads(cli(fresh, "keys", "list", "--json").stdout)
    assert [k["status"] for k in listed] == ["previous", "active"] and listed[1]["kid"] == rotated["kid"]
    retired = json.loads(cli(fresh, "keys", "retire", "--json", listed[0]["kid"]).stdout)
    assert retired == {"kid": listed[0]["kid"], "status": "retired"}
    issued = token_of(fresh, "alice", "10m", "--scope", "subscribe:room.*")
    claims = jwt.decode(issued["token"], options={"verify_signature": False})
    assert issued["jti"] == claims["jti"] and issued["exp"] == claims["exp"] == claims["iat"] + 600
    assert (issued["sub"], issued["kid"], issued["scope"]) == ("alice", rotated["kid"], "subscribe:room.*")
    revoked = json.loads(cli(fresh, "token", "revoke", "--jti", issued["jti"], "--json").stdout)
    assert revoked["revoked"] == {"jti": issued["jti"]}
    inspected = json.loads(cli(fresh, "token", "inspect", "--json", issued["token"], check=False).stdout)
    assert (inspected["accepted"], inspected["reason"]) == (False, "token revoked")


def test_help_version_and_defaults(fresh):
    """Issue 13: `keys retire --help` answered "no key with kid '--help'"; no --version; no help or defaults."""
    result = cli(fresh, "keys", "retire", "--help")
    assert result.stdout.startswith("usage: secure-ws keys retire") and "--force" in result.stdout
    assert cli(fresh, "--version").stdout.strip() == "secure-ws 0.1.0"
    serve_help = " ".join(cli(fresh, "serve", "--help").stdout.split())
    for shown in ("(default: 8443)", "(default: 127.0.0.1)", "(default: 1)", "--forwarded-allow-ips", "--no-tls", "--internal-port"):
        assert shown in serve_help, shown
    assert "(required)" in " ".join(cli(fresh, "token", "issue", "--help").stdout.split())


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from secure_ws.cli import build_parser

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")
                continue
            assert action.help, f"{path} {action.dest}: no help text"
            if action.option_strings and action.nargs != 0 and action.dest not in ("help", "version"):
                assert "(default:" in text or "(required)" in text, f"{path} {action.option_strings}: default not shown"

    walk(build_parser(), "secure-ws")


# == keys retire ===============================================================================


def test_retiring_the_active_key_is_refused_unless_forced(fresh):
    """Issue 13: retiring the only active key succeeded and locked every client out."""
    [key] = keys_on_file(fresh)
    result = cli(fresh, "keys", "retire", key["kid"], check=False)
    assert result.returncode == 2, result
    [line] = result.stderr.strip().splitlines()[-1:]
    assert "active" in line and "keys rotate" in line and "--force" in line, result.stderr
    assert keys_on_file(fresh)[0]["status"] == "active"
    cli(fresh, "keys", "retire", "--force", key["kid"])
    assert keys_on_file(fresh)[0]["status"] == "retired"


# == token inspect =============================================================================


def inspect(folder: Path, token: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    result = cli(folder, "token", "inspect", "--json", token, env=env, check=False)
    return result.returncode, json.loads(result.stdout)


def test_token_inspect_shows_claims_and_the_verdict(fresh, tmp_path):
    issued = token_of(fresh, "carol")
    code, report = inspect(fresh, issued["token"])
    assert code == 0 and report["accepted"] is True, report
    assert report["header"]["kid"] == issued["kid"] and report["claims"]["jti"] == issued["jti"]
    text = cli(fresh, "token", "inspect", issued["token"]).stdout
    assert '"sub": "carol"' in text and "this deployment: accepted" in text

    key = jwt.PyJWK({k: v for k, v in json.loads((fresh / "signing-keys.json").read_text())["keys"][0].items()
                     if k not in ("created", "status")}, algorithm="EdDSA").key
    now = int(time.time())
    base = {"iss": "secure-ws", "aud": "secure-ws", "sub": "dave", "iat": now, "exp": now + 600, "jti": "j1"}

    def signed(claims: dict[str, Any], **headers: Any) -> str:
        return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": issued["kid"], **headers})

    cases = {
        "expired": (signed({**base, "iat": now - 900, "exp": now - 300}), "token expired", "exp"),
        "wrong audience": (signed({**base, "aud": "someone-else"}), "invalid token", "aud"),
        "wrong issuer": (signed({**base, "iss": "someone-else"}), "invalid token", "iss"),
        "unknown kid": (jwt.encode(base, key, algorithm="EdDSA", headers={"kid": "no-such-kid"}), "invalid token", "no-such-kid"),
        "key from the token": (signed(base, jku="https://attacker.example/jwks.json"), "invalid token", "jku"),
    }
    tampered = issued["token"].rsplit(".", 1)[0] + ".AAAA" + issued["token"].rsplit(".", 1)[1][4:]
    cases["bad signature"] = (tampered, "invalid token", "Signature")
    for name, (token, reason, why) in cases.items():
        code, report = inspect(fresh, token)
        assert code == 1 and report["accepted"] is False, (name, report)
        assert report["reason"] == reason and why.lower() in report["detail"].lower(), (name, report)
        assert isinstance(report["claims"], dict), (name, report)  # shown even when refused

    cli(fresh, "token", "revoke", "--jti", issued["jti"])
    code, report = inspect(fresh, issued["token"])
    assert (code, report["reason"]) == (1, "token revoked")


# == rotate_keys.py ============================================================================


def test_rotate_keys_script_elsewhere_refuses_instead_of_making_a_fresh_certs(fresh, tmp_path):
    """Issue 13: run from another directory, it created a fresh certs/ there and exited 0."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in base_env(fresh).items() if not k.startswith("SECURE_WS_")}
    script = [sys.executable, str(ROOT / "scripts" / "rotate_keys.py")]
    result = subprocess.run(script, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    [line] = result.stderr.strip().splitlines()
    assert str(elsewhere / "certs" / "signing-keys.json") in line and "working directory" in line, line
    assert list(elsewhere.iterdir()) == [], "nothing is created"
    # From the deployment's folder, with the same relative paths as the CLI, it works and says where.
    (fresh / "certs").mkdir()
    for name in ("signing-keys.json", "jwks.json"):
        (fresh / name).rename(fresh / "certs" / name)
    result = subprocess.run(script, cwd=fresh, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("active: "), result
    assert str(fresh / "certs" / "signing-keys.json") in result.stderr


# == serve: --forwarded-allow-ips, --no-tls, --internal-port =========================================


def test_forwarded_allow_ips_drives_the_throttle_and_the_access_log(keydir, issue):
    """Issue 13: the README told balancer users to pass --forwarded-allow-ips, which `serve` did not have."""
    env = base_env(keydir, SECURE_WS_HANDSHAKE_RATE_LIMIT="2/minute")
    srv = Serve(keydir, env, ("--forwarded-allow-ips", "127.0.0.1")).start()
    try:
        async def handshake(client: str) -> int | str:
            try:
                async with srv.connect(issue(), headers={"X-Forwarded-For": client}) as ws:
                    await welcome(ws)
                    return "welcome"
            except websockets.InvalidStatus as exc:
                return exc.response.status_code

        async def go() -> None:
            assert [await handshake("203.0.113.7") for _ in range(3)] == ["welcome", "welcome", 429]
            assert await handshake("203.0.113.8") == "welcome"  # another client behind the same balancer

        run(go())
        wait_for(lambda: "203.0.113.8" in srv.log(), 5, "the forwarded client in the access log")
    finally:
        srv.stop()


def test_no_tls_is_refused_on_a_public_address(keydir, tmp_path):
    code, output, _ = run_to_exit(serve_argv("--no-tls", "--host", "0.0.0.0"), base_env(keydir), tmp_path, within=30)
    assert code == 2, output
    [line] = output.strip().splitlines()
    assert "--no-tls" in line and "--forwarded-allow-ips" in line, line


class PlainServe(Serve):
    """`secure-ws serve --no-tls` on loopback: ws:// and http://."""

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


def test_no_tls_on_loopback_serves_plain_websocket(keydir, issue):
    srv = PlainServe(keydir, base_env(keydir), ("--no-tls",)).start()
    try:
        assert srv.get("/healthz")[0] == 200

        async def go() -> None:
            url = f"ws://127.0.0.1:{srv.port}/ws"
            async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {issue()}"}) as ws:
                await welcome(ws)
                assert await request(ws, {"type": "ping"}) == PONG

        run(go())
        assert "Uvicorn running on http://" in srv.log()
    finally:
        srv.stop()


def test_internal_port_moves_metrics_off_the_public_port(keydir, issue):
    internal = free_port()
    srv = Serve(keydir, base_env(keydir), ("--internal-port", str(internal))).start()
    try:
        assert srv.get("/metrics")[0] == 404
        assert srv.get("/healthz")[0] == 200
        conn = http.client.HTTPSConnection("127.0.0.1", internal, context=srv.ssl_context(), timeout=10)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            body = response.read().decode()
            assert response.status == 200 and "secure_ws_connections_active" in body
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
            assert response.status == 404, "the internal listener serves only the operators' routes"
        finally:
            conn.close()

        async def go() -> None:
            async with srv.connect(issue()) as ws:  # the public port still serves clients
                await welcome(ws)

        run(go())
    finally:
        srv.stop()


# == logs ======================================================================================


def test_text_logs_carry_iso_utc_timestamps(keydir):
    srv = Serve(keydir, base_env(keydir)).start()
    try:
        assert srv.get("/healthz")[0] == 200
        wait_for(lambda: "GET /healthz" in srv.log(), 5, "the access line")
    finally:
        srv.stop()
    lines = [line for line in srv.log().splitlines() if line.strip()]
    assert lines and all(ISO_LINE.match(line) for line in lines), "\n".join(lines)


def test_json_access_log_lines_are_fields_and_never_hold_a_token(keydir, issue):
    token = issue()
    srv = Serve(keydir, base_env(keydir, SECURE_WS_LOG_FORMAT="json")).start()
    try:
        assert srv.get(f"/healthz?access_token={token}")[0] == 200

        async def go() -> None:
            async with srv.connect(token, "query") as ws:
                await welcome(ws)

        run(go())
        wait_for(lambda: '"event": "websocket"' in srv.log(), 5, "the WebSocket line")
    finally:
        srv.stop()
    log = srv.log()
    assert token not in log and token.split(".")[2] not in log
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]
    [access] = [e for e in entries if e.get("event") == "http" and e.get("path") == "/healthz"]
    assert (access["method"], access["status"]) == ("GET", 200) and access["client"].startswith("127.0.0.1")
    assert access["time"].endswith("Z")
    [ws_line] = [e for e in entries if e.get("event") == "websocket"]
    assert (ws_line["path"], ws_line["status"]) == ("/ws", "accepted")


# == the dev banner and the README ===============================================================


def test_dev_banner_try_it_command_works_and_keeps_the_token_out_of_the_url(tmp_path):
    """Issue 13: the banner's command put the token in the query string the README says to avoid."""
    port = free_port()
    env = {k: v for k, v in base_env(tmp_path).items() if not k.startswith("SECURE_WS_")}
    log_path = tmp_path / "dev.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "secure_ws", "dev", "--port", str(port)], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        line = wait_for(lambda: next((x for x in log_path.read_text().splitlines() if x.strip().startswith("TOKEN=")), None),
                        30, "the try-it line")
        wait_for(lambda: "Application startup complete" in log_path.read_text(), 30, "the dev server")
        banner = log_path.read_text()
        assert "access_token=" not in banner and "?token=" not in banner
        result = subprocess.run(["bash", "-c", line.strip()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        first, second = (json.loads(x) for x in result.stdout.splitlines())
        assert first["type"] == "welcome" and first["sub"] == "dev-user" and second == PONG
        assert line.split(maxsplit=1)[0].startswith("TOKEN=")  # the token is in the environment, not the URL
    finally:
        proc.terminate()
        proc.wait(15)


def test_readme_stands_alone():
    """Issue 13: the README linked outside the repository, and its Python snippet never called main()."""
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which is not in the repository"
    assert "docs/PROTOCOL.md" in readme
    for block in re.findall(r"```python\n(.*?)```", readme, re.S):
        if "async def main(" in block:
            assert re.search(r"^asyncio\.run\(main\(", block, re.M), f"this snippet never runs main():\n{block}"
