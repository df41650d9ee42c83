"""``uvicorn secure_ws.main:app``: the app built from the environment at import.

A configuration mistake ends the process here with one line naming the
variable, before uvicorn binds its socket and without a traceback.
"""

from __future__ import annotations

import sys

from .app import create_app
from .settings import ConfigError
from .uvicorn.install import install

install()  # uvicorn's default HTTP and WebSocket protocols build ours (see secure_ws.uvicorn.install)

try:
    app = create_app()
except ConfigError as exc:
    print(f"secure-ws: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
