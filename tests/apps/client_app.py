"""An application for the Python client's and TestServer's tests: a plain call, a refusal, a rate-limited call,
pushes to oneself and to another sub, a kick, and (when the server side has it) a streamed call that records how it
ended."""

from __future__ import annotations

import asyncio
from typing import Any

from secure_ws import Context, Reject, SecureWS

api = SecureWS()
app = api.app

# How each `count` stream ended, by the `tag` its caller gave: "done", "closed" (its finally ran early). Bounded by
# the tests' own calls.
stream_ends: dict[str, str] = {}


@api.handler("add")
async def add(ctx: Context, data: Any) -> Any:
    if not isinstance(data, dict) or not isinstance(data.get("a"), int) or not isinstance(data.get("b"), int):
        raise Reject("bad_numbers", "a and b must be integers")
    return {"sum": data["a"] + data["b"], "sub": ctx.sub, "role": ctx.claims.get("role")}


@api.handler("scarce", rate_limit="2/minute")
async def scarce(ctx: Context, data: Any) -> Any:
    return "ok"


@api.handler("admin.only", scope="admin")
async def admin_only(ctx: Context, data: Any) -> Any:
    return "yes"


@api.handler("push.me")
async def push_me(ctx: Context, data: Any) -> Any:
    await ctx.send(data)
    return None


@api.handler("notify")
async def notify(ctx: Context, data: Any) -> Any:
    await api.send(data["sub"], data["data"])
    return None


@api.handler("kick.me")
async def kick_me(ctx: Context, data: Any) -> Any:
    await api.disconnect(ctx.sub)
    return None


@api.stream("count")
async def count(ctx: Context, data: Any) -> Any:
    tag = str(data.get("tag", ""))
    stream_ends[tag] = "running"
    try:
        for n in range(int(data.get("to", 3))):
            yield {"n": n}
            await asyncio.sleep(float(data.get("every", 0)))
        if data.get("fail"):
            raise Reject("stream_failed", "failed after some chunks")
        stream_ends[tag] = "done"
    finally:
        if stream_ends[tag] == "running":
            stream_ends[tag] = "closed"


@api.handler("stream.end")
async def stream_end(ctx: Context, data: Any) -> Any:
    return stream_ends.get(str(data))
