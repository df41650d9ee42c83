"""What an application handler or hook sees of its connection (SPEC §9)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..wire.closes import DISCONNECTED, Close
from ..wire.messages import check_channel, encode, parse_since
from .builtins import subscribe_to

if TYPE_CHECKING:
    from .types import Connection


class Context:
    """One per connection, made on its first handler call or hook. ``claims`` and ``scopes`` follow a
    ``refresh``: they are always the current token's."""

    __slots__ = ("_session",)

    def __init__(self, session: Connection) -> None:
        self._session = session

    @property
    def sub(self) -> str:
        return self._session.principal.sub

    @property
    def claims(self) -> Mapping[str, Any]:
        """Every claim of the token, read-only (nested objects too)."""
        return self._session.principal.claims

    @property
    def scopes(self) -> tuple[str, ...]:
        return self._session.principal.scopes

    @property
    def connection_id(self) -> str:
        return self._session.id

    @property
    def path_params(self) -> Mapping[str, Any]:
        """The WebSocket path's parameters (``SecureWS(path="/ws/{tenant}")`` → ``{"tenant": …}``); empty by default."""
        return self._session.path_params

    async def subscribe(self, channel: str, since: Mapping[str, Any] | None = None) -> None:
        """Subscribe this connection to ``channel`` from the server side (no scope or hook is asked): the client gets
        ``subscribed`` as if it had asked, and with ``since`` (``{"offset": N, "epoch": E}``) what it missed.
        ``ValueError`` for a bad channel or ``since``; refusals (``limit_exceeded``, storage down) are raised as
        the client's own subscribe would be answered."""
        session = self._session
        position = None if since is None else parse_since(dict(since))
        session.hold()
        try:
            await subscribe_to(session, check_channel(channel), position, False, None)
        finally:
            session.unhold()

    async def send(self, data: Any) -> None:
        """Push ``{"type":"push","data":data}`` to this connection (``TypeError`` if ``data`` is not JSON)."""
        self._session.deliver(encode({"type": "push", "data": data}))

    async def publish(self, channel: str, data: Any) -> dict[str, Any]:
        """Deliver ``data`` to every subscriber of ``channel``, on every worker, ``from`` this ``sub``; returns
        ``{"offset": N, "epoch": E}`` (``{}`` with history off). No scope is checked: the application decides who
        may. ``ValueError`` for a bad channel name, ``TypeError`` for data that is not JSON."""
        return await self._session.deps.publish(channel, data, self._session.principal.sub)

    async def close(self) -> None:
        """Close this connection with 1008 ``disconnected``."""
        await self._session.close(Close.POLICY_VIOLATION, DISCONNECTED)
