import asyncio
import os
import ssl

from secure_ws.client import Client


async def main() -> None:
    tls = ssl.create_default_context(cafile="certs/ca.crt")  # the dev CA; omit it for a public CA
    async with Client("wss://localhost:8443/ws", lambda: os.environ["TOKEN"], ssl=tls) as client:
        await client.subscribe("room.lobby")  # re-subscribed, with recovery, after every reconnect
        lobby = client.messages("room.lobby")
        await client.call("chat.say", {"text": "hi"})
        async for message in lobby:
            print(message.get("from"), message["data"])


asyncio.run(main())
