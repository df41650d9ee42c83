"""What the client raises on purpose: every error a caller can catch, with the server's ``code``."""

from __future__ import annotations

from typing import Any

from ..wire.closes import AMBIGUOUS, INVALID, MISSING, ORIGIN_NOT_ALLOWED, REVOKED

#: 1008 close reasons that no fresh token can fix: the client stops instead of reconnecting.
FATAL_REASONS = frozenset({INVALID, REVOKED, ORIGIN_NOT_ALLOWED, AMBIGUOUS, MISSING})


class ClientError(Exception):
    """Base class of everything the client raises on purpose."""


class ConnectionRefused(ClientError):
    """The server accepted the upgrade and closed before the ``welcome`` (or, for a fatal reason, later).

    ``code`` and ``reason`` are the server's close code and reason, e.g. ``(1008, "too many connections")``.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"server closed the connection: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class AuthenticationFailed(ConnectionRefused):
    """The server closed with 1008 and a reason that a fresh token cannot fix (:data:`FATAL_REASONS`).

    The client does not reconnect after this. ``code`` and ``reason`` are the
    server's close code and reason, e.g. ``(1008, "token revoked")``.
    """

    def __init__(self, code: int, reason: str) -> None:
        ClientError.__init__(self, f"server refused the credentials: {code} {reason}")
        self.code = code
        self.reason = reason


class HandshakeRejected(ClientError):
    """The server answered the upgrade with an HTTP status that retrying will not change (e.g. 403, 404)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"server rejected the WebSocket handshake with HTTP {status}")
        self.status = status


class ConnectionLost(ClientError):
    """The connection closed while a request was waiting for its reply.

    The request may or may not have been processed. ``code`` and ``reason``
    describe the close (1006 and ``""`` when no close frame arrived).
    """

    def __init__(self, code: int = 1006, reason: str = "") -> None:
        super().__init__(f"connection closed before the reply ({code} {reason})".rstrip())
        self.code = code
        self.reason = reason


class ClientClosed(ClientError):
    """The client was closed with ``close()`` (or its ``async with`` block ended)."""

    def __init__(self) -> None:
        super().__init__("the client is closed")


class Overflow(ClientError):
    """An iterator of pushes or messages was not read while its buffer filled up: it ends with this error
    rather than grow without bound or drop frames silently. Read faster, or close iterators you do not read."""


class ProtocolViolation(ClientError):
    """The server answered with a frame that cannot be the reply (e.g. a call answered by something other than
    ``result``): a server bug or not a secure_ws server."""


class RequestError(ClientError):
    """The server answered a request with ``{"type": "error", "code": …}``.

    ``code`` is one of ``bad_request``, ``unknown_type``, ``forbidden``, ``limit_exceeded``, ``unavailable``,
    ``busy``, ``timeout``, ``cancelled``, ``internal_error``, ``rate_limited`` (see :exc:`RateLimited`) or an
    application's own (``Reject(code, …)``); ``message`` its text; ``frame`` the whole error frame.
    """

    def __init__(self, frame: dict[str, Any]) -> None:
        self.frame = frame
        self.code: str = str(frame.get("code", ""))
        self.message: str = str(frame.get("message", ""))
        super().__init__(f"{self.code}: {self.message}" if self.message else self.code)


class RateLimited(RequestError):
    """The request was dropped by a rate limit; retry after ``retry_after_ms`` milliseconds
    (``retry_after`` is the same in seconds)."""

    def __init__(self, frame: dict[str, Any]) -> None:
        super().__init__(frame)
        raw = frame.get("retry_after_ms", 0)
        self.retry_after_ms: int = raw if type(raw) is int and raw >= 0 else 0
        self.retry_after: float = self.retry_after_ms / 1000.0


def request_error(frame: dict[str, Any]) -> RequestError:
    """The exception for an ``error`` frame."""
    return RateLimited(frame) if frame.get("code") == "rate_limited" else RequestError(frame)
