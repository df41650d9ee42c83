"""``uvicorn secure_ws.main:app``: ``SecureWS().app``, the built-in types only, built from the environment at import.

A configuration mistake ends the process here with one line naming the
variable, before uvicorn binds its socket and without a traceback.
"""

from __future__ import annotations

from .app import SecureWS
from .uvicorn.install import install

install()  # uvicorn's default HTTP and WebSocket protocols build ours (see secure_ws.uvicorn.install)

app = SecureWS().app
