"""The shapes core's modules meet through, so that none of them needs another's class.

A :class:`Connection` is what the dispatch table's routes, the hub and a
handler's ``Context`` see of a session; :class:`Members` is what a session sees
of the hub, :class:`Presence` of the presence records; :class:`SessionDeps` is
what a session is given of the process.
:class:`secure_ws.core.session.Session` and :class:`secure_ws.core.hub.Hub`
are the implementations.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..auth.scopes import Grants
from ..auth.tokens import Principal
from ..settings import Settings
from ..state.channel_options import ChannelOptions
from ..state.storage import History, Position
from .channel_hooks import ChannelHooks
from .ratelimit import Limiter

Request = dict[str, Any]
# A dispatch table entry: handles one decoded request as far as it goes without waiting, returns what is left.
Route = Callable[["Connection", Request], Awaitable[None] | None]
# What an application call runs, given the connection's Context and the request's data.
Invoke = Callable[[Any, Any], Awaitable[Any]]
Hook = Callable[[Any], Awaitable[None]]  # on_connect / on_disconnect, given the Context


@dataclass(frozen=True, slots=True)
class Chunks:
    """What an :data:`Invoke` returns to answer with a stream instead of one result (the RPC proxy's NDJSON
    body): each value ``iterator`` yields is a chunk; it is closed (``aclose``) however the call ends, and then
    ``close`` is called, which releases what it holds even if it never started (when its ``finally`` never runs)."""

    iterator: AsyncGenerator[Any, None]
    close: Callable[[], Awaitable[None]] | None = None


class Connection(Protocol):
    id: str
    principal: Principal
    grants: Grants
    channels: set[str]
    closed: bool
    path_params: dict[str, Any]
    server_channels: set[str] | None

    @property
    def deps(self) -> SessionDeps: ...

    def send(self, text: str) -> None: ...
    def deliver(self, text: str, channel: str = "", offset: int = 0, epoch: str = "", data: bytes | None = None,
                later: bool = False) -> None: ...
    def writable(self) -> Awaitable[None] | None: ...
    def recovered_to(self, channel: str, position: Position) -> None: ...
    async def close(self, code: int, reason: str = "") -> None: ...
    def close_soon(self, code: int, reason: str) -> None: ...
    def waiting(self, request: Request, work: Awaitable[None]) -> Awaitable[None]: ...
    def hold(self) -> None: ...
    def unhold(self) -> None: ...
    @property
    def context(self) -> Any: ...
    def call(self, request: Request, invoke: Invoke, handler: Any = None, timeout_code: str = ...) -> None: ...
    def cancel(self, id: str | int) -> None: ...
    def renew(self, principal: Principal) -> None: ...
    def log_fields(self, event: str, code: int | None = None, reason: str | None = None) -> dict[str, Any]: ...


class Members(Protocol):
    """This process's live connections, by sub and by channel."""

    def add(self, connection: Connection) -> None: ...
    async def remove(self, connection: Connection) -> None: ...
    async def join(self, connection: Connection, channel: str) -> None: ...
    async def leave(self, connection: Connection, channel: str) -> None: ...


class Presence(Protocol):
    """Who is subscribed where, on every node (:class:`secure_ws.core.presence.Roster`)."""

    async def join(self, connection: Connection, channel: str, join_leave: bool) -> None: ...
    async def leave(self, connection: Connection, channel: str) -> None: ...
    async def clients(self, channel: str) -> tuple[dict[str, str], int]: ...


@dataclass(frozen=True, slots=True)
class SessionDeps:
    """What a session needs of the process, and nothing more (built once by the service)."""

    settings: Settings
    limiter: Limiter
    hub: Members
    routes: Mapping[str, Route]
    fallback: Route  # for a type no route names: unknown_type, or the RPC proxy
    authenticate: Callable[[str], Awaitable[Principal]]
    # Service.publish: (channel, data, sender) to every subscriber, every worker → {"offset","epoch"} or {} (no history)
    publish: Callable[[str, Any, str | None], Awaitable[dict[str, Any]]]
    history: Callable[[str, Position | None, int], Awaitable[History | None]]  # storage's read; None: history off
    unavailable: tuple[type[BaseException], ...]  # what storage raises when it cannot be reached
    presence: Presence
    # The one place that decides a channel's options (secure_ws.state.channel_options.ChannelRules).
    channels: Callable[[str], ChannelOptions] = lambda channel: ChannelOptions(None)
    on_subscribe: ChannelHooks = ChannelHooks([], 0.0)
    on_publish: ChannelHooks = ChannelHooks([], 0.0)
    on_connect: Sequence[Hook] = ()
    on_disconnect: Sequence[Hook] = ()
