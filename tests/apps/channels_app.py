"""An application for tests/test_channels.py: channel options by pattern, subscribe and publish hooks,
server-side subscriptions, and a WebSocket path with a parameter."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount

from secure_ws import Context, Reject, SecureWS

api = SecureWS(path="/ws/{tenant}")
app = api.app

api.channels("room.vip.*", history_size=3)
api.channels("room.*", history_size=5, history_ttl="10m", presence=True, join_leave=True, client_publish=True)
api.channels("room.vip.never", history_size=7)  # shadowed by room.vip.*: the first match wins
api.channels("quiet.*", presence=False, join_leave=False)
api.channels("feed.*", client_publish=False)
api.channels("nohist.*", history_size=0)
for n in range(45):  # with the ones above, 50 patterns: what scripts/bench.py measures against
    api.channels(f"filler{n}.*", history_size=10)


@api.on_subscribe("room.*")
async def may_join(ctx: Context, channel: str) -> Any:
    if channel == "room.closed":
        raise Reject("room_closed", "this room is closed")
    if channel == "room.boom":
        raise RuntimeError("on_subscribe is broken")
    if channel == "room.hang":
        await asyncio.sleep(3600)
    if channel == "room.stubborn":  # catches its cancellation and answers anyway: still too late
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return {"late": True}
    if channel == "room.silent":
        return None
    return {"topic": channel[5:], "tenant": ctx.path_params["tenant"]}


@api.on_publish("room.*")
async def may_say(ctx: Context, channel: str, data: Any) -> Any:
    if data == "bad word":
        raise Reject("bad_word", "mind your language")
    if data == "boom":
        raise RuntimeError("on_publish is broken")
    if data == "hang":
        await asyncio.sleep(3600)
    if isinstance(data, str):
        return data.upper()
    return None  # published as sent


@api.on_connect
async def personal(ctx: Context) -> None:
    if ctx.claims.get("personal"):
        await ctx.subscribe(f"user.{ctx.sub}")


@api.handler("where")
async def where(ctx: Context, data: Any) -> Any:
    return dict(ctx.path_params)


@api.handler("follow")
async def follow(ctx: Context, data: Any) -> Any:
    await ctx.subscribe(data["channel"], since=data.get("since"))
    return "following"


@api.handler("shout")
async def shout(ctx: Context, data: Any) -> Any:
    """The server side publishes where clients may not."""
    return await api.publish(data["channel"], data["data"])


# Mounted in a host app: the WebSocket is then /realtime/ws/{tenant}.
host = Starlette(routes=[Mount("/realtime", app=api.app)], lifespan=api.lifespan)
