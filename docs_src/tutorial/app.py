"""The tutorial's application: one handler, one stream, a greeting push; clients read channels with the built-ins."""

from secure_ws import Context, Reject, SecureWS

api = SecureWS()  # settings from the environment and .env; read when the app starts serving


@api.handler("notes.add", scope="notes:write")
async def add_note(ctx: Context, data: dict) -> dict:
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not 0 < len(text) <= 200:
        raise Reject("bad_note", "a note is a text of 1 to 200 characters")  # an error frame; the connection stays
    reply = await ctx.publish("notes.board", {"text": text})  # to every subscriber, on every worker
    return {"saved": True, **reply}  # the result's data; with history on, the note's offset and epoch


@api.stream("notes.countdown")
async def countdown(ctx: Context, data: dict):
    for n in range(int(data.get("from", 3)), 0, -1):
        yield {"n": n}  # one chunk frame each; the client may cancel


@api.on_connect
async def greet(ctx: Context) -> None:
    await ctx.send({"hello": ctx.sub})  # a push, right after the welcome
