async with Client(url, get_token, ssl=tls, on_push=print) as client:       # on_push: a callback, or…
    pushes = client.pushes()                        # …each push's data (ctx.send, api.send, POST /api/send)
    order = await client.call("orders.create", {"items": [1]}, timeout=5)  # the result's data
    async for piece in client.stream("ai.complete", {"prompt": "hi"}):      # each chunk's data
        if enough(piece):
            break                                   # leaving the loop sends {"type":"cancel","id":N}
    await client.subscribe("room.lobby", join_leave=True)                   # join/leave frames too
    async for frame in client.messages("room.lobby"):                       # message, join, leave
        ...
    await client.history("room.lobby", limit=10)    # {"messages": [...], "offset": N, "epoch": E}
    await client.presence("room.lobby")             # {"clients": {connection_id: {"sub": S}}, "count": N}
