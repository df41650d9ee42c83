"""The application ``scripts/bench.py`` runs (``uvicorn bench_app:app``, or ``secure-ws serve bench_app:api``): the
built-in service plus a Python handler, ``bench.echo``, that returns what it is sent — a handler's round trip
against the built-in ``echo``'s, in the same server process — and the streams measured by bench.py and stress.py."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from secure_ws import Context, SecureWS

api = SecureWS()
app = api.app


if os.environ.get("BENCH_SUBSCRIBE_HOOK") == "1":  # bench.py's channels phase: a subscribe through a hook

    @api.on_subscribe("bench*")
    async def bench_admit(ctx: Context, channel: str) -> Any:
        return None  # allowed, nothing added to `subscribed`


@api.handler("bench.echo")
async def bench_echo(ctx: Context, data: Any) -> Any:
    return data


# Streams: ``bench.stream`` yields ``n`` chunks of ``size`` characters (CPU per chunk, and the never-reading
# client of scripts/stress.py), counting them in ``produced`` (per process) so that a pause can be seen from
# outside; ``bench.wait`` yields once and then waits for a cancel (the cancel latency).
produced = {"chunks": 0}


@api.stream("bench.stream")
async def bench_stream(ctx: Context, data: Any) -> Any:
    piece = "x" * data.get("size", 12)
    for _ in range(data["n"]):
        produced["chunks"] += 1
        yield piece


@api.handler("bench.produced")
async def bench_produced(ctx: Context, data: Any) -> Any:
    return produced["chunks"]


@api.stream("bench.wait")
async def bench_wait(ctx: Context, data: Any) -> Any:
    yield "ready"
    await asyncio.Event().wait()  # until cancelled
