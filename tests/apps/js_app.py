"""An application for the TypeScript client's tests (clients/js/test): one type per ability it exercises."""

from __future__ import annotations

import asyncio
from typing import Any

from secure_ws import Context, Reject, SecureWS

api = SecureWS()
app = api.app

counts = {"streams_finished": 0}  # how many streams of this worker ran their `finally`


@api.handler("add")
async def add(ctx: Context, data: Any) -> Any:
    return {"sum": data["a"] + data["b"]}


@api.handler("refuse")
async def refuse(ctx: Context, data: Any) -> Any:
    raise Reject("nope", "refused on purpose")


@api.handler("slow")
async def slow(ctx: Context, data: Any) -> Any:
    await asyncio.sleep(min(float(data), 5.0))
    return "late"


@api.handler("push.me")
async def push_me(ctx: Context, data: Any) -> Any:
    await ctx.send(data)
    return None


@api.handler("features")
async def features(ctx: Context, data: Any) -> Any:
    return counts


@api.stream("count")
async def count(ctx: Context, data: Any) -> Any:
    try:
        for i in range(int(data["n"])):
            yield {"i": i}
            await asyncio.sleep(float(data.get("every", 0)))
    finally:
        counts["streams_finished"] += 1
