from secure_ws import Context, Reject, SecureWS

api = SecureWS()  # settings from the environment and .env, read when it starts serving


@api.on_connect
async def welcome(ctx: Context) -> None:
    await ctx.send({"motd": f"hello {ctx.sub}"})  # a push to this connection, right after the welcome


@api.handler("chat.say", scope="chat:write")
async def say(ctx: Context, data: dict) -> dict:
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not 0 < len(text) <= 500:
        raise Reject("bad_text", "a text of 1 to 500 characters")  # an error frame; the connection stays
    return await ctx.publish("room.lobby", {"text": text})  # to every subscriber, on every worker


async def announce(text: str) -> None:  # from anywhere in your server: every subscriber, every worker
    await api.publish("room.lobby", {"text": text})
