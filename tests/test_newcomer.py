"""A newcomer follows the tutorial: a fresh clone (of this repository's HEAD), a fresh virtualenv, the install
command, their own app.py served by `secure-ws dev`, a token, the Python client, a push from a backend. The shell
lines are read from the very files the pages include (docs_src/tutorial/*.sh), so the page cannot say one thing
while this test runs another; the only addition is `--port` (a free one, not 8443) and the URL that goes with it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs_src" / "tutorial"


def _lines(name: str) -> list[str]:
    return [line for line in (TUTORIAL / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def _bash(command: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_tutorial_from_a_fresh_clone(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout to clone from")
    app = tmp_path / "app"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(app)], check=True, timeout=60)
    # Nothing of this checkout's environment leaks in: no virtualenv, no SECURE_WS_* variable.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECURE_WS_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # a python3 ≥ 3.11
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(ROOT / ".venv")))
    env["PATH"] = os.pathsep.join([str(Path(sys.base_prefix) / "bin"), env["PATH"]])

    (install,) = _lines("install.sh")
    done = _bash(install, app, env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    activate = ". .venv/bin/activate && "
    for name in ("app.py", "client.py", "push.py"):  # the files the reader saves
        shutil.copy(TUTORIAL / name, app / name)

    port = free_port()
    (serve,) = _lines("dev_app.sh")
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(["bash", "-c", f"{activate}exec {serve} --port {port}"], cwd=app, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (app / "certs" / "server.crt").exists() or _bash(f"exec 3<>/dev/tcp/127.0.0.1/{port}", app, env).returncode:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.1)

        client_env = {**env, "URL": f"wss://localhost:{port}/ws"}
        ran = _bash(activate + " && ".join(_lines("client.sh")), app, client_env, timeout=60)
        assert ran.returncode == 0, ran.stdout + ran.stderr[-3000:]
        assert "push: {'hello': 'alice'}" in ran.stdout
        assert "result: {'saved': True" in ran.stdout
        assert "message: {'text': 'buy milk'}" in ran.stdout
        assert "chunk: {'n': 1}" in ran.stdout

        key_line, push_line = _lines("push.sh")
        push_env = {**env, "BASE": f"https://localhost:{port}"}
        created = _bash(f"{activate}{key_line} && echo $KEY", app, push_env)
        assert created.returncode == 0 and created.stdout.strip().startswith("swk_"), created.stderr
        push_env["KEY"] = created.stdout.strip().splitlines()[-1]
        deadline = time.monotonic() + 20  # the server picks a new key up within 2 s
        while True:
            pushed = _bash(activate + push_line, app, push_env, timeout=30)
            if pushed.returncode == 0:
                break
            assert time.monotonic() < deadline, pushed.stdout + pushed.stderr[-2000:]
            time.sleep(0.2)
        assert pushed.stdout.splitlines() == ['{}', '{}'] or "'offset'" in pushed.stdout or '"offset"' in pushed.stdout, pushed.stdout
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()


def test_the_tutorials_two_workers_on_redis_and_the_publisher(tmp_path: Path, keydir: Path, issue, own_redis) -> None:
    """The last step: `secure-ws serve app:api --workers 2` on Redis, and publisher.py pushing through that Redis
    to a client connected to one of the workers. (Redis: a throw-away one instead of 127.0.0.1:6379/0.)"""
    import asyncio
    import ssl

    from helpers import base_env

    from secure_ws.client import Client

    redis = own_redis().start()
    for name in ("app.py", "publisher.py"):
        shutil.copy(TUTORIAL / name, tmp_path / name)
    export, serve = _lines("workers.sh")
    assert export == "export SECURE_WS_STORAGE_URL=redis://127.0.0.1:6379/0"
    env = base_env(keydir, SECURE_WS_STORAGE_URL=redis.url)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.environ.get("PATH", ""))])
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(["bash", "-c", f"exec {serve} --port {port}"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while _bash(f"exec 3<>/dev/tcp/127.0.0.1/{port}", tmp_path, env).returncode:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.1)

        async def main() -> None:
            tls = ssl.create_default_context(cafile=str(keydir / "ca.crt"))
            token = issue(sub="alice", scope="subscribe:notes.*")
            async with Client(f"wss://localhost:{port}/ws", lambda: token, ssl=tls) as client:
                pushes = client.pushes()
                assert await anext(pushes) == {"hello": "alice"}
                await client.subscribe("notes.board")
                board = client.messages("notes.board")
                (line,) = _lines("publisher.sh")
                ran = await asyncio.to_thread(_bash, line.replace("redis://127.0.0.1:6379/0", redis.url), tmp_path, env)
                assert ran.returncode == 0, ran.stderr[-3000:]
                assert "'offset'" in ran.stdout
                message = await asyncio.wait_for(anext(board), 10)
                assert message["data"] == {"text": "from a worker of ours"} and "from" not in message
                assert await asyncio.wait_for(anext(pushes), 10) == {"unread": 4}

        asyncio.run(main())
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()
