"""A chat with rooms, on secure_ws.

Run it from the repository root (it needs the pydantic extra: ``pip install "secure-ws[pydantic]"``)::

    uvicorn examples.chat.app:app --ssl-keyfile certs/server.key --ssl-certfile certs/server.crt

Clients read a room with the built-in ``subscribe`` to ``room.<name>`` (their token grants
``subscribe:room.*``) and speak with ``chat.say`` (``chat:write``). Their tokens carry no ``publish:``
right, so every message to a room goes through ``say``'s checks.

Requests and their replies:

- ``{"type":"chat.say","id":1,"data":{"room":"lobby","text":"hi"}}`` → ``{"type":"result","id":1,"data":{"sent":true}}``,
  and every subscriber of ``room.lobby`` gets
  ``{"type":"message","channel":"room.lobby","from":<sub>,"data":{"text":"hi"}}``;
- ``{"type":"chat.who","id":2}`` → ``{"type":"result","id":2,"data":{"online":[<sub>,…],"count":N}}``;
- ``{"type":"chat.kick","id":3,"data":{"sub":"mallory"}}`` (scope ``chat:admin``) →
  ``{"type":"result","id":3,"data":{"kicked":"mallory"}}``; mallory gets a push, then 1008 ``disconnected``.

On connecting, after the welcome, every client gets ``{"type":"push","data":{"motd":…,"rooms":[…]}}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from secure_ws import Context, Reject, SecureWS

api = SecureWS()  # settings from the environment and .env, exactly as for `secure-ws serve`

ROOMS = ("lobby", "random", "help")  # the rooms this chat serves; `say` anywhere else is `bad_room`

# Who is online, by connection. In memory and per process: with several workers (or hosts) each one
# knows only its own connections, so `chat.who` answers for the worker the client is connected to.
# Bounded: past MAX_TRACKED connections, newcomers are served but not listed.
MAX_TRACKED = 10_000
MAX_LISTED = 100  # subs in one `chat.who` reply
online: dict[str, str] = {}  # connection_id -> sub


class Say(BaseModel):
    model_config = ConfigDict(extra="forbid")

    room: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")  # the channel-name charset; room.<room> stays a valid channel
    text: str = Field(min_length=1, max_length=500)


class Kick(BaseModel):
    sub: str = Field(min_length=1, max_length=256)


@api.on_connect
async def greet(ctx: Context) -> None:
    # Runs before the welcome; what it pushes arrives right after it.
    if len(online) < MAX_TRACKED:
        online[ctx.connection_id] = ctx.sub
    await ctx.send({"motd": f"Hello {ctx.sub}. Subscribe to room.<name> to read, send chat.say to speak.", "rooms": list(ROOMS)})


@api.on_disconnect
async def left(ctx: Context) -> None:
    online.pop(ctx.connection_id, None)


@api.handler("chat.say", scope="chat:write", rate_limit="10/10 seconds")
async def say(ctx: Context, data: Say) -> Any:
    if data.room not in ROOMS:
        raise Reject("bad_room", "no such room; rooms: " + ", ".join(ROOMS))  # never echo what the client sent
    await ctx.publish(f"room.{data.room}", {"text": data.text})  # to every subscriber, on every worker, from ctx.sub
    return {"sent": True}


@api.handler("chat.who")
async def who(ctx: Context, data: Any) -> Any:
    subs = sorted(set(online.values()))
    return {"online": subs[:MAX_LISTED], "count": len(subs)}


@api.handler("chat.kick", scope="chat:admin")
async def kick(ctx: Context, data: Kick) -> Any:
    # On every worker and host (over Redis when SECURE_WS_STORAGE_URL points at one). The kicked client may
    # reconnect with its token; to keep it out, revoke it: `secure-ws token revoke --sub <sub>`.
    await api.send(data.sub, {"kicked_by": ctx.sub})
    await api.disconnect(data.sub)
    return {"kicked": data.sub}


app = api.app
