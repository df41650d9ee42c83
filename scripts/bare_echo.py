"""The baseline for ``scripts/bench.py``: a bare Starlette WebSocket echo and broadcast server.

What a hand-written FastAPI/Starlette endpoint does with no authentication, no
rate limit and no protocol: ``/ws`` echoes each text frame; on ``/fan`` a frame
from one connection is sent to every other ``/fan`` connection.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

subscribers: set[WebSocket] = set()


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


async def fan(websocket: WebSocket) -> None:
    await websocket.accept()
    subscribers.add(websocket)
    try:
        while True:
            text = await websocket.receive_text()
            for other in tuple(subscribers):
                if other is not websocket:
                    try:
                        await other.send_text(text)
                    except Exception:  # a subscriber gone mid-broadcast
                        subscribers.discard(other)
    except WebSocketDisconnect:
        pass
    finally:
        subscribers.discard(websocket)


app = Starlette(routes=[WebSocketRoute("/ws", echo), WebSocketRoute("/fan", fan)])
