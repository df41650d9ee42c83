from typing import Any

from secure_ws import Context, Reject, SecureWS

api = SecureWS(path="/ws/{tenant}")          # wss://host/ws/acme: ctx.path_params == {"tenant": "acme"}
MEMBERS = {"acme": {"alice", "bob"}}         # who may enter the rooms of each tenant


@api.on_connect
async def personal(ctx: Context) -> None:
    await ctx.subscribe(f"user.{ctx.sub}")   # every connection hears its own channel; no scope is asked


@api.on_subscribe("room.*")
async def enter(ctx: Context, channel: str) -> Any:
    if ctx.sub not in MEMBERS.get(ctx.path_params["tenant"], ()):
        raise Reject("not_a_member", "ask the owner for an invitation")  # an error frame; the connection stays
    return {"topic": f"welcome to {channel}"}    # optional: sent as "data" in `subscribed`


@api.on_publish("room.*")
async def speak(ctx: Context, channel: str, data: Any) -> Any:
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise Reject("bad_message", 'publish {"text": …}')
    return {"text": text.strip()}                # optional: published instead of data (None: as sent)
