"""The service's presence, channel and node reads as message handlers, for tests/test_presence.py
(what the server API's `presence`, `channels` and `info` call)."""

from __future__ import annotations

from typing import Any

from secure_ws import Context, SecureWS

api = SecureWS()
app = api.app


@api.handler("admin.presence", scope="admin")
async def presence(ctx: Context, data: Any) -> Any:
    return await api.service.presence(data["channel"])


@api.handler("admin.channels", scope="admin")
async def channels(ctx: Context, data: Any) -> Any:
    return await api.service.channels()


@api.handler("admin.info", scope="admin")
async def info(ctx: Context, data: Any) -> Any:
    return await api.service.info()
