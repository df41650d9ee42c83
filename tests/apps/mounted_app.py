"""secure_ws mounted inside host applications: Starlette with ``lifespan=api.lifespan``, FastAPI with a
host lifespan that enters ``api.lifespan(app)``, and a host that forgot the lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from secure_ws import Context, SecureWS

api = SecureWS()


@api.handler("hello")
async def hello(ctx: Context, data: Any) -> Any:
    return f"hello {ctx.sub}"


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("host app")


async def upload(request: Request) -> PlainTextResponse:
    """A host route that waits on a request body (the protocol bounds how slowly it may come)."""
    return PlainTextResponse(str(len(await request.body())))


starlette_host = Starlette(
    routes=[Route("/", home), Route("/upload", upload, methods=["POST"]), Mount("/realtime", app=api.app)], lifespan=api.lifespan
)


@contextlib.asynccontextmanager
async def host_lifespan(app: Any) -> AsyncIterator[None]:
    async with api.lifespan(app):  # the host's own start-up and shutdown go around it
        yield


fastapi_host = FastAPI(lifespan=host_lifespan)
fastapi_host.mount("/realtime", api.app)


@fastapi_host.get("/")
async def fastapi_home() -> dict[str, str]:
    return {"host": "fastapi"}


forgot_lifespan = Starlette(routes=[Mount("/realtime", app=api.app)])
