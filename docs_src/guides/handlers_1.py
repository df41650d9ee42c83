from pydantic import BaseModel, ConfigDict, Field
from secure_ws import Context, Reject, SecureWS

api = SecureWS()                    # settings from the environment and .env, as for the service
ROOMS = ("lobby", "random", "help")

class Say(BaseModel):
    model_config = ConfigDict(extra="forbid")
    room: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")   # room.<room> stays a valid channel name
    text: str = Field(min_length=1, max_length=500)

@api.handler("chat.say", scope="chat:write", rate_limit="10/10 seconds")
async def say(ctx: Context, data: Say):
    if data.room not in ROOMS:
        raise Reject("bad_room", "no such room; rooms: " + ", ".join(ROOMS))  # → error frame; the connection stays
    await ctx.publish(f"room.{data.room}", {"text": data.text})  # to every subscriber, on any worker, "from" ctx.sub
    return {"sent": True}                                          # → the result's data

@api.on_connect
async def greet(ctx: Context):
    await ctx.send({"motd": f"Hello {ctx.sub}.", "rooms": list(ROOMS)})  # a push, right after the welcome

app = api.app
