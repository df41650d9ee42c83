import asyncio, json, os, ssl, websockets

async def main(token):
    ctx = ssl.create_default_context(cafile="certs/ca.crt")  # the dev CA; omit for a public CA
    async with websockets.connect("wss://localhost:8443/ws", ssl=ctx,
                                  additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        print(await ws.recv())                               # welcome
        await ws.send(json.dumps({"type": "echo", "id": 1, "data": {"hello": "world"}}))
        print(await ws.recv())                               # {"type":"echo","data":{...},"id":1}

asyncio.run(main(os.environ["TOKEN"]))                       # TOKEN=$(secure-ws token issue --sub alice) python client.py
