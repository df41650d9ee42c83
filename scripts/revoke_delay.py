#!/usr/bin/env python3
"""How long a revocation takes to reach a live connection (SPEC §4: within 2 s).

    python scripts/revoke_delay.py [--runs 20]

Builds a throw-away folder with the real ops commands (``secure-ws certs``, ``secure-ws keys
rotate``), starts ``uvicorn secure_ws.main:app`` over TLS on a free port with in-memory storage,
then ``--runs`` times: issues a token (``secure-ws token issue``), connects with it, runs
``secure-ws token revoke --jti <its jti>`` as a subprocess and waits for the server's close frame.

Prints, for the close frame's arrival, p50 and max measured
  * from the moment the operator's command started (what an operator experiences), and
  * from the moment the revocation was written (the revocation file's mtime).

Exit status 0 when every run was closed 1008 ``token revoked`` within 2 s of the command
returning, 1 otherwise. Needs ``websockets`` (``pip install -e ".[test]"``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import websockets

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECURE_WS_")}
    env.update(
        SECURE_WS_JWKS_FILE=str(folder / "jwks.json"),
        SECURE_WS_SIGNING_KEYS_FILE=str(folder / "signing-keys.json"),
        SECURE_WS_REVOCATION_FILE=str(folder / "revocations.json"),
        SECURE_WS_HANDSHAKE_RATE_LIMIT="100000/minute",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
        PYTHONUNBUFFERED="1",
    )
    return env


def secure_ws(folder: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "secure_ws", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise SystemExit(f"secure-ws {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def jti_of(token: str) -> str:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]


def start_server(folder: Path, env: dict[str, str], port: int, log) -> subprocess.Popen:  # noqa: ANN001
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "uvicorn", "secure_ws.main:app", "--host", "127.0.0.1", "--port", str(port),
            "--ssl-keyfile", str(folder / "server.key"), "--ssl-certfile", str(folder / "server.crt"),
        ],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}; see {log.name}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("server did not start listening within 20 s")


async def one_run(folder: Path, env: dict[str, str], port: int, context: ssl.SSLContext, n: int) -> tuple[float, float, float, str]:
    token = secure_ws(folder, env, "token", "issue", "--sub", f"delay-{n}", "--ttl", "10m")
    async with websockets.connect(
        f"wss://localhost:{port}/ws", ssl=context, additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert hello["type"] == "welcome", hello

        async def closed() -> tuple[float, str]:
            try:
                async with asyncio.timeout(10):
                    while True:
                        await ws.recv()
            except websockets.ConnectionClosed as exc:
                rcvd = exc.rcvd
                return time.time(), f"{rcvd.code} {rcvd.reason}" if rcvd else "no close frame"
            except TimeoutError:
                return time.time(), "not closed within 10 s"
            return time.time(), "?"

        watcher = asyncio.create_task(closed())
        await asyncio.sleep(0)
        started = time.time()
        # `--jti=J`: a base64url jti may begin with "-", which `--jti J` would read as an option.
        await asyncio.to_thread(secure_ws, folder, env, "token", "revoke", f"--jti={jti_of(token)}")
        returned = time.time()
        at, outcome = await watcher
    written = (folder / "revocations.json").stat().st_mtime
    return at - started, at - written, at - returned, outcome


async def measure(folder: Path, env: dict[str, str], port: int, runs: int) -> list[tuple[float, float, float, str]]:
    context = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    return [await one_run(folder, env, port, context, n) for n in range(runs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure revocation → close delay on a live connection.")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="secure-ws-revoke-delay-") as tmp:
        folder = Path(tmp)
        env = environment(folder)
        secure_ws(folder, env, "certs", "--out", str(folder))
        secure_ws(folder, env, "keys", "rotate")
        port = free_port()
        with open(folder / "server.log", "wb") as log:
            proc = start_server(folder, env, port, log)
            try:
                results = asyncio.run(measure(folder, env, port, args.runs))
            finally:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    from_start = [r[0] for r in results]
    from_write = [r[1] for r in results]
    bad = [r for r in results if r[3] != "1008 token revoked" or r[2] > 2.0]
    print(f"{len(results)} runs of `secure-ws token revoke --jti` against a live connection (memory:// storage)")
    print(f"  from command start:     p50 {statistics.median(from_start) * 1000:6.0f} ms   max {max(from_start) * 1000:6.0f} ms")
    print(f"  from revocation write:  p50 {statistics.median(from_write) * 1000:6.0f} ms   max {max(from_write) * 1000:6.0f} ms")
    for r in bad:
        print(f"  FAILED: {r[3]!r}, {r[2]:.2f}s after the command returned")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
