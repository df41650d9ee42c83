"""The soak's short run (``scripts/soak.py``; the long one is documented there and in the README): clients
publishing, subscribing, calling a handler, refreshing and reconnecting for 60 s against two workers on a
Sentinel-managed Redis whose master is killed twice. No channel message lost or duplicated, every
acknowledged publication in history, the server's RSS flat after warm-up."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_soak_60s_with_two_redis_failovers():
    if shutil.which("redis-sentinel") is None:
        pytest.skip("redis-sentinel is not installed (Debian: apt-get install redis-sentinel)")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--clients", "30", "--seconds", "60", "--workers", "2",
         "--failover-every", "25", "--json"],
        capture_output=True, text=True, timeout=240,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads(lines[-1])
    print("\nsoak: " + json.dumps(summary))
    assert summary["problems"] == [] and result.returncode == 0, summary
    assert len(summary["failovers"]) == 2, summary
    assert summary["actions"].get("publish", 0) > 500 and summary["delivered"] > 2000, summary
