"""Under plain ``uvicorn secure_ws.main:app``, have uvicorn's default protocol classes build ours.

uvicorn imports its HTTP and WebSocket protocol classes before it imports the
application, so :mod:`secure_ws.main` cannot choose them; it calls :func:`install`.
"""

from __future__ import annotations

from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from .http_protocol import GuardedHttpToolsProtocol, PeerH11Protocol
from .ws_protocol import WebSocketProtocol, log, supported

# uvicorn's default class → ours.
_REPLACEMENTS: dict[type, type] = {
    HttpToolsProtocol: GuardedHttpToolsProtocol,
    H11Protocol: PeerH11Protocol,
    WebSocketsSansIOProtocol: WebSocketProtocol,
}


def _build(cls: type, *args: Any, **kwargs: Any) -> Any:
    return object.__new__(_REPLACEMENTS.get(cls, cls))


def install() -> None:
    """Have uvicorn's default HTTP (httptools) and WebSocket (websockets-sansio) protocol classes
    build :class:`GuardedHttpToolsProtocol` and :class:`WebSocketProtocol` instead.

    ``type.__call__`` runs the ``__init__`` of the object ``__new__`` returns
    when it is an instance of the class called, so uvicorn's
    ``HttpToolsProtocol(config=…)`` yields a fully built subclass. ``--http h11`` gets the peer
    (:class:`PeerH11Protocol`) but not our head and body bounds; ``--ws websockets`` and ``--ws wsproto``
    are left alone.
    """
    if not supported():
        log.warning(
            "uvicorn %s is not one secure_ws's protocols were tested with: using uvicorn's own", uvicorn.__version__
        )
        return
    for original in _REPLACEMENTS:
        original.__new__ = staticmethod(_build)  # type: ignore[assignment]
