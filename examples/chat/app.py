"""A chat with rooms, on secure_ws.

Run it from the repository root (it needs the pydantic extra: ``pip install "secure-ws[pydantic]"``)::

    uvicorn examples.chat.app:app --ssl-keyfile certs/server.key --ssl-certfile certs/server.crt

Clients read a room with the built-in ``subscribe`` to ``room.<name>`` (their token grants
``subscribe:room.*``) and speak with ``chat.say`` (``chat:write``), or with the built-in ``publish`` when their
token grants ``publish:room.*``. The room rules live in the channel hooks: ``on_subscribe`` admits only the
rooms this chat serves (and tells the newcomer who is there), ``on_publish`` checks what a client publishes
directly; ``chat.say`` applies the same room check to what it publishes. Who is online is the presence of the
``chat.online`` channel, which ``on_connect`` subscribes every connection to: with Redis, every worker and host
sees the same list.

Requests and their replies:

- ``{"type":"subscribe","id":1,"channel":"room.lobby"}`` → ``{"type":"subscribed","id":1,"channel":"room.lobby",
  "data":{"online":[<sub>,…]},…}``; ``room.attic`` → ``{"type":"error","id":1,"code":"bad_room",…}``;
- ``{"type":"chat.say","id":1,"data":{"room":"lobby","text":"hi"}}`` → ``{"type":"result","id":1,"data":{"sent":true}}``,
  and every subscriber of ``room.lobby`` gets
  ``{"type":"message","channel":"room.lobby","from":<sub>,"data":{"text":"hi"}}``;
- ``{"type":"chat.who","id":2}`` → ``{"type":"result","id":2,"data":{"online":[<sub>,…],"count":N}}``;
- ``{"type":"chat.kick","id":3,"data":{"sub":"mallory"}}`` (scope ``chat:admin``) →
  ``{"type":"result","id":3,"data":{"kicked":"mallory"}}``; mallory gets a push, then 1008 ``disconnected``.

On connecting, after the welcome, every client gets ``{"type":"subscribed","channel":"chat.online",…}`` and
``{"type":"push","data":{"motd":…,"rooms":[…]}}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from secure_ws import Context, Reject, SecureWS

api = SecureWS()  # settings from the environment and .env, exactly as for `secure-ws serve`

ROOMS = ("lobby", "random", "help")  # the rooms this chat serves; anything else is `bad_room`
ONLINE = "chat.online"  # every connection is subscribed to it: its presence is who is online, on every worker
MAX_LISTED = 100  # subs in one `chat.who` reply, or in a `subscribed`'s list of who is in the room
MAX_TEXT = 500

api.channels("room.*", history_size=50, history_ttl="10m")  # a newcomer may catch up on the last 50 lines
api.channels(ONLINE, history_size=0, client_publish=False, join_leave=False)  # presence only


class Say(BaseModel):
    model_config = ConfigDict(extra="forbid")

    room: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")  # the channel-name charset; room.<room> stays a valid channel
    text: str = Field(min_length=1, max_length=MAX_TEXT)


class Kick(BaseModel):
    sub: str = Field(min_length=1, max_length=256)


def check_room(name: str) -> None:
    if name not in ROOMS:
        raise Reject("bad_room", "no such room; rooms: " + ", ".join(ROOMS))  # never echo what the client sent


async def online(channel: str) -> list[str]:
    """The subs subscribed to ``channel``, on every worker and host (presence), at most MAX_LISTED."""
    return sorted({entry["sub"] for entry in (await api.service.presence(channel)).values()})


@api.on_connect
async def greet(ctx: Context) -> None:
    # Runs before the welcome; what it subscribes and pushes arrives right after it.
    await ctx.subscribe(ONLINE)
    await ctx.send({"motd": f"Hello {ctx.sub}. Subscribe to room.<name> to read, send chat.say to speak.", "rooms": list(ROOMS)})


@api.on_subscribe("room.*")
async def enter(ctx: Context, channel: str) -> Any:
    check_room(channel.removeprefix("room."))
    return {"online": (await online(channel))[:MAX_LISTED]}  # sent as the `subscribed`'s data


@api.on_publish("room.*")
async def speak(ctx: Context, channel: str, data: Any) -> Any:
    """What a client with ``publish:room.*`` publishes itself gets chat.say's checks."""
    check_room(channel.removeprefix("room."))
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not 1 <= len(text) <= MAX_TEXT or len(data) != 1:
        raise Reject("bad_message", f'publish {{"text": …}} with 1 to {MAX_TEXT} characters')
    return None  # published as sent


@api.handler("chat.say", scope="chat:write", rate_limit="10/10 seconds")
async def say(ctx: Context, data: Say) -> Any:
    check_room(data.room)
    await ctx.publish(f"room.{data.room}", {"text": data.text})  # to every subscriber, on every worker, from ctx.sub
    return {"sent": True}


@api.handler("chat.who")
async def who(ctx: Context, data: Any) -> Any:
    subs = await online(ONLINE)
    return {"online": subs[:MAX_LISTED], "count": len(subs)}


@api.handler("chat.kick", scope="chat:admin")
async def kick(ctx: Context, data: Kick) -> Any:
    # On every worker and host (over Redis when SECURE_WS_STORAGE_URL points at one). The kicked client may
    # reconnect with its token; to keep it out, revoke it: `secure-ws token revoke --sub <sub>`.
    await api.send(data.sub, {"kicked_by": ctx.sub})
    await api.disconnect(data.sub)
    return {"kicked": data.sub}


app = api.app
