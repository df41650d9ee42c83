"""``uvicorn secure_ws.main:app``: ``SecureWS().app``, the built-in types only, built from the environment at import.

A configuration mistake ends the process here with one line naming the
variable, before uvicorn binds its socket and without a traceback.
"""

from __future__ import annotations

from .app import SecureWS

app = SecureWS().app  # which also has uvicorn's default protocols build ours (see secure_ws.uvicorn.install)
