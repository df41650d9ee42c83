"""The application ``scripts/bench.py --mode uvicorn`` runs: the built-in service plus one Python handler,
``bench.echo``, that returns what it is sent — a handler's round trip against the built-in ``echo``'s,
in the same server process."""

from __future__ import annotations

from typing import Any

from secure_ws import Context, SecureWS

api = SecureWS()
app = api.app


@api.handler("bench.echo")
async def bench_echo(ctx: Context, data: Any) -> Any:
    return data
