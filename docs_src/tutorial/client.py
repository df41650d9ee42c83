"""Connect, call the handler, read the stream, subscribe with recovery: TOKEN=... python client.py"""

import asyncio
import os
import ssl

from secure_ws.client import Client

URL = os.environ.get("URL", "wss://localhost:8443/ws")


async def main() -> None:
    tls = ssl.create_default_context(cafile="certs/ca.crt")  # the dev CA that `secure-ws dev` made
    async with Client(URL, lambda: os.environ["TOKEN"], ssl=tls) as client:
        pushes = client.pushes()
        print("push:", await anext(pushes))  # {'hello': 'alice'}, from on_connect
        await client.subscribe("notes.board")  # re-subscribed with `since` after every reconnect
        board = client.messages("notes.board")
        print("result:", await client.call("notes.add", {"text": "buy milk"}))
        message = await anext(board)
        print("message:", message["data"], "offset", message.get("offset"))
        async for chunk in client.stream("notes.countdown", {"from": 3}):
            print("chunk:", chunk)


if __name__ == "__main__":
    asyncio.run(main())
