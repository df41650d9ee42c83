"""An application on secure_ws for the handler tests: every SPEC §9 behaviour has a type here."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel

from secure_ws import Context, Reject, SecureWS

api = SecureWS()
app = api.app

gate = asyncio.Event()  # "hold" calls wait on it until a "release" (from any connection of this worker)
disconnected: list[str] = []  # subs whose on_disconnect ran, newest last (bounded: the tests make a few)


class Item(BaseModel):
    sku: str
    qty: int


class Order(BaseModel):
    items: list[Item]


@api.on_connect
async def admit(ctx: Context) -> None:
    if ctx.claims.get("refuse"):
        raise Reject("not_welcome", "go away")
    if ctx.claims.get("hook_fault"):
        raise RuntimeError("on_connect is broken")
    if ctx.claims.get("greet"):
        await ctx.send({"hello": ctx.sub})  # pushed before the welcome is sent: must arrive after it


@api.on_disconnect
async def gone(ctx: Context) -> None:
    disconnected.append(ctx.sub)
    del disconnected[:-100]


@api.handler("orders.create", scope="orders:write", rate_limit="3/minute")
async def create_order(ctx: Context, data: Any) -> Any:
    if not isinstance(data, dict) or not data.get("items"):
        raise Reject("empty_order", "an order needs items")
    await ctx.publish(f"user.{ctx.sub}", {"created": 42})
    return {"order_id": 42}


@api.handler("orders.typed")
async def typed_order(ctx: Context, data: Order) -> Any:
    return {"items": len(data.items), "qty": sum(i.qty for i in data.items)}


@api.handler("whoami")
async def whoami(ctx: Context, data: Any) -> Any:
    try:
        ctx.claims["sub"] = "someone else"  # type: ignore[index]
        writable = True
    except TypeError:
        writable = False
    return {"sub": ctx.sub, "scopes": list(ctx.scopes), "connection_id": ctx.connection_id,
            "claims_writable": writable, "tier": ctx.claims.get("tier")}


@api.handler("boom")
async def boom(ctx: Context, data: Any) -> Any:
    raise RuntimeError("handler bug with secret detail")


@api.handler("not.json")
async def not_json(ctx: Context, data: Any) -> Any:
    return {"when": object()}


@api.handler("surrogate")
async def surrogate(ctx: Context, data: Any) -> Any:
    return {"text": "a\ud800b"}  # a lone surrogate: valid in Python, carried by no UTF-8


filling: dict[str, Any] = {}  # what the last "fill" call did, for "fill.state" (one entry per key, overwritten)


@api.handler("fill")
async def fill(ctx: Context, data: Any) -> Any:
    """Push ``data`` characters at a time until the connection is no longer writable, then wait until it is."""
    session = ctx._session  # type: ignore[attr-defined]
    filling.clear()
    filling["first"] = session.writable() is None
    pushed = 0
    while (waiter := session.writable()) is None:
        await ctx.send("x" * data)
        pushed += 1
    filling["pushed"] = pushed
    filling["waiting"] = True
    await waiter
    filling["waiting"] = False
    return {"pushed": pushed, "writable": session.writable() is None}


@api.handler("fill.state")
async def fill_state(ctx: Context, data: Any) -> Any:
    return filling


@api.handler("hang")
async def hang(ctx: Context, data: Any) -> Any:
    await asyncio.Event().wait()  # never set: only the handler timeout ends it


@api.handler("hold")
async def hold(ctx: Context, data: Any) -> Any:
    await gate.wait()
    return "released"


@api.handler("release")
async def release(ctx: Context, data: Any) -> Any:
    gate.set()
    gate.clear()  # waiters already woken stay woken; later holds wait again
    return "ok"


@api.handler("push.me")
async def push_me(ctx: Context, data: Any) -> Any:
    await ctx.send(data)
    return "pushed"


@api.handler("bye")
async def bye(ctx: Context, data: Any) -> Any:
    await ctx.close()


@api.handler("disconnects")
async def disconnects(ctx: Context, data: Any) -> Any:
    return list(disconnected)


# The server side, reachable from a test client: what a backend would call in-process.
@api.handler("admin.send", scope="admin")
async def admin_send(ctx: Context, data: Any) -> Any:
    await api.send(data["sub"], data["data"])
    return "sent"


@api.handler("admin.disconnect", scope="admin")
async def admin_disconnect(ctx: Context, data: Any) -> Any:
    await api.disconnect(data["sub"])
    return "disconnected"


@api.handler("admin.publish", scope="admin")
async def admin_publish(ctx: Context, data: Any) -> Any:
    await api.publish(data["channel"], data["data"])
    return "published"
