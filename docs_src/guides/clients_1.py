import asyncio, ssl
from secure_ws.client import Client

def get_token() -> str:                  # or async; called for every connection and every refresh
    return open("/run/secrets/ws-token").read().strip()

async def main() -> None:
    tls = ssl.create_default_context(cafile="certs/ca.crt")   # dev CA; omit for a public CA
    async with Client("wss://localhost:8443/ws", get_token, ssl=tls, refresh_before=30) as client:
        print(await client.echo({"hello": "world"}))           # request/reply matched by id
        await client.subscribe("room.lobby")                   # re-subscribed after every reconnect
        stream = client.messages("room.lobby")
        await client.publish("room.lobby", {"text": "hi"})
        async for message in stream:
            print(message["from"], message["data"])

asyncio.run(main())
