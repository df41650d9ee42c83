"""What an application handler raises to refuse a request, and the error codes of handler calls."""

from __future__ import annotations

import re

# Error codes an application may send: short and plain, so a client can switch on them and no log or frame
# carries markup or control characters from them.
CODE = re.compile(r"[a-z][a-z0-9_.:-]{0,63}")
MAX_MESSAGE_CHARS = 1024

INTERNAL_ERROR = "internal_error"  # the handler raised, or returned something that is not JSON
TIMEOUT = "timeout"  # past SECURE_WS_HANDLER_TIMEOUT (or SECURE_WS_STREAM_TIMEOUT): cancelled
BUSY = "busy"  # SECURE_WS_MAX_INFLIGHT calls already running on this connection
CANCELLED = "cancelled"  # the client sent cancel for it


class Reject(Exception):  # noqa: N818 (the name the API documents)
    """``raise Reject("empty_order", "an order needs items")``: the client gets an error frame with this
    code and message; the connection stays open."""

    def __init__(self, code: str, message: str = "") -> None:
        if type(code) is not str or not CODE.fullmatch(code):
            raise ValueError(f"Reject code must match {CODE.pattern}, got {code!r:.80}")
        if type(message) is not str:
            raise TypeError("Reject message must be a string")
        super().__init__(code, message)
        self.code = code
        self.message = message[:MAX_MESSAGE_CHARS]
