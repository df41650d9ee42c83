"""The TypeScript client (clients/js): installed from its lock file, built, type-checked, tested, packed, and its
browser bundle held to its size budget and to the copy this package serves at /demo.

The client's own behaviour is proven by its ``node --test`` suites (clients/js/test), which start this repository's
server over real TLS; this module runs them as one test, so that the README's single test command covers them.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT

JS = ROOT / "clients" / "js"
SHIPPED = ROOT / "secure_ws" / "static" / "secure-ws-client.js"
GZIP_BUDGET = 8 * 1024  # bytes, minified + gzip: below socket.io-client's 14.4 KB and pusher-js's 18.7 KB


def npm(*args: str, timeout: float = 300, env: dict[str, str] | None = None, cwd: Path = JS) -> subprocess.CompletedProcess:
    result = subprocess.run(["npm", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"npm {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def built() -> Iterator[Path]:
    """``npm ci`` from the committed lock file, then ``npm run build`` (tsc to dist/, esbuild's bundle)."""
    node = shutil.which("node")
    if node is None or shutil.which("npm") is None:
        pytest.skip("the TypeScript client needs Node >= 20 and npm on PATH")
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip().lstrip("v").split(".")[0])
    if major < 20:
        pytest.skip(f"the TypeScript client needs Node >= 20 (found {major})")
    npm("ci", "--no-audit", "--no-fund")
    npm("run", "build")
    yield JS / "dist"


def test_typecheck(built: Path) -> None:
    """The sources and the documented surface (test/types/surface.ts, used as an application would) type-check."""
    npm("run", "typecheck")
    assert (built / "index.d.ts").read_text().count("export declare class") >= 5


def test_bundle_size_budget(built: Path) -> None:
    """``npm run size`` (esbuild, minified) and an independent gzip of its output both stay within the budget."""
    size = json.loads(npm("run", "--silent", "size").stdout.strip().splitlines()[-1])
    bundle = (built / "secure-ws-client.min.js").read_bytes()
    assert size["bytes"] == len(bundle)
    assert size["gzip"] <= GZIP_BUDGET, size
    assert len(gzip.compress(bundle, 9, mtime=0)) <= GZIP_BUDGET


def test_shipped_bundle_is_a_fresh_build(built: Path) -> None:
    """secure_ws/static/secure-ws-client.js (served at /demo) is exactly what clients/js/src builds to today:
    after editing the client, run ``npm run build && npm run bundle:python`` in clients/js."""
    assert SHIPPED.read_bytes() == (built / "secure-ws-client.min.js").read_bytes()


def test_node_suites_against_the_real_server(built: Path) -> None:
    """``node --test``: every ability against uvicorn over TLS, garbage from a fake server, two workers on Redis,
    the bundle in headless Chromium (skipped there, with its reason, when Chromium is absent)."""
    env = {**os.environ, "SECURE_WS_PYTHON": sys.executable}
    result = subprocess.run(
        ["node", "--test", "--test-concurrency=1", "--test-timeout=120000", "--test-reporter=tap", "test/"],
        cwd=JS, env=env, capture_output=True, text=True, timeout=600,
    )
    tail = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, tail
    assert "\n# fail 0" in result.stdout, tail
    passed = int(result.stdout.rsplit("\n# pass ", 1)[1].split()[0])
    assert passed >= 25, tail


def test_npm_pack_makes_an_installable_tarball(built: Path, tmp_path: Path) -> None:
    packed = json.loads(npm("pack", "--json", "--pack-destination", str(tmp_path)).stdout)
    files = {f["path"] for f in packed[0]["files"]}
    assert {"package.json", "dist/index.js", "dist/index.d.ts", "dist/secure-ws-client.min.js"} <= files, files
    assert not any(f.startswith(("src/", "test/", "node_modules/")) for f in files), files
    tarball = tmp_path / packed[0]["filename"]

    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text(json.dumps({"name": "app", "private": True, "type": "module"}))
    npm("install", "--no-audit", "--no-fund", "--offline", str(tarball), cwd=app)
    manifest = json.loads((app / "node_modules" / "secure-ws-client" / "package.json").read_text())
    assert manifest.get("dependencies", {}) == {}, "no runtime dependency"
    probe = (
        "import { Client, AuthError, RequestError, RateLimitedError } from 'secure-ws-client';"
        "const e = new RateLimitedError('slow down', 250);"
        "console.log(JSON.stringify([typeof Client, e instanceof RequestError, e.retryAfterMs, new AuthError(1008, 'token revoked').reason]));"
    )
    out = subprocess.run(["node", "--input-type=module", "-e", probe], cwd=app, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["function", True, 250, "token revoked"]
