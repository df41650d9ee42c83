"""secure_ws: an authenticated, rate-limited WebSocket API service over wss, and a library for your own API on it.

``from secure_ws import SecureWS, Context, Reject`` (and ``Publisher`` for backends sharing the Redis, ``issue_token``
to sign a token with the deployment's active key). They are loaded on first use, so that
``secure_ws.client`` (which needs only :mod:`secure_ws.wire`) does not load the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import SecureWS
    from .auth.signing import issue_token
    from .core.context import Context
    from .core.handlers import RegistrationError
    from .core.reject import Reject
    from .publisher import Publisher

__all__ = ["SecureWS", "Context", "Reject", "RegistrationError", "Publisher", "issue_token"]
__version__ = "0.1.0"

_WHERE = {
    "SecureWS": "app", "Context": "core.context", "Reject": "core.reject", "RegistrationError": "core.handlers",
    "Publisher": "publisher", "issue_token": "auth.signing",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'secure_ws' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
