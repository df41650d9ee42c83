"""A raw broadcaster for ``scripts/bench.py``'s fan-out comparison: picows over TLS, no authentication, no
protocol. A frame from one connection is sent to every other connection; its WebSocket frame is built once
and written as is to each transport — the least work a Python fan-out can do per subscriber.

    python scripts/picows_fan.py PORT CERTFILE KEYFILE
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import sys

from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

connections: set[WSTransport] = set()  # bound: the benchmark's subscribers


def server_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class Fan(WSListener):
    def on_ws_connected(self, transport: WSTransport) -> None:
        connections.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        connections.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif frame.msg_type == WSMsgType.TEXT:
            data = server_frame(frame.get_payload_as_bytes())
            for other in connections:
                if other is not transport:
                    other.underlying_transport.write(data)


async def main(port: int, certfile: str, keyfile: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)

    def listener(request: WSUpgradeRequest) -> Fan:
        return Fan()

    server = await ws_create_server(listener, "127.0.0.1", port, ssl=context)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
