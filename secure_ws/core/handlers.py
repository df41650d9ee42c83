"""The handler registry: what an application adds to the dispatch table, checked when it is added.

Every mistake here is the application's, made at import time, so each raises
:class:`RegistrationError` with a message that names the type and says what to
change — never later, on a client's request. The table itself (built-in types
first, then these) is put together by :func:`secure_ws.core.dispatch.routes`.
"""

from __future__ import annotations

import inspect
import re
import sys
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from limits import RateLimitItem, parse_many

from ..auth.scopes import MAX_SCOPE_CHARS
from ..state.channel_options import Rule, rule
from ..wire.messages import BAD_REQUEST, ProtocolError
from .builtins import BUILT_INS
from .channel_hooks import ChannelHook

if TYPE_CHECKING:
    from .context import Context
    from .ratelimit import Limiter

TYPE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")
BUILT_IN_TYPES = frozenset(BUILT_INS)
# Replies and pushes the server sends: a request of one of these types would make replies ambiguous.
SERVER_TYPES = frozenset(
    ("pong", "subscribed", "unsubscribed", "published", "refreshed", "welcome", "message", "error", "result", "push", "join", "leave", "chunk")
)
MAX_FIELDS_NAMED = 10  # a bad_request names at most this many invalid fields
_FIELD = re.compile(r"[A-Za-z0-9_]{1,64}")

HandlerFunc = Callable[["Context", Any], Awaitable[Any]]
StreamFunc = Callable[["Context", Any], AsyncIterator[Any]]
HookFunc = Callable[["Context"], Awaitable[None]]


class RegistrationError(ValueError):
    """A handler or hook that cannot be registered as written."""


@dataclass(slots=True)
class Handler:
    type: str
    func: HandlerFunc | StreamFunc
    scope: str | None
    rate_limits: tuple[RateLimitItem, ...]
    validate: Callable[[Any], Any] | None  # the data's pydantic model, if annotated with one
    limiter: Limiter | None = None  # the per-type window, bound to storage when the service starts
    stream: bool = False  # an `async def` generator (@api.stream): each value it yields is a chunk


class Registry:
    """Application handlers by type, and the connect/disconnect hooks. Frozen once the service starts:
    the dispatch table is built once, and a connection never sees it change."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.on_connect: list[HookFunc] = []
        self.on_disconnect: list[HookFunc] = []
        self.channels: list[Rule] = []  # api.channels(…), in the order declared (after the channels file's)
        self.on_subscribe: list[tuple[str, ChannelHook]] = []  # (pattern, hook), in the order registered
        self.on_publish: list[tuple[str, ChannelHook]] = []
        self.frozen = False

    def add(
        self, type: str, func: HandlerFunc | StreamFunc, scope: str | None = None, rate_limit: str | None = None, stream: bool = False
    ) -> Handler:
        self._check_open(f"handler {type!r}")
        if not isinstance(type, str) or not TYPE_NAME.fullmatch(type):
            raise RegistrationError(f"handler type {type!r} must match ^{TYPE_NAME.pattern}$")
        if type in BUILT_IN_TYPES or type in SERVER_TYPES:
            raise RegistrationError(f"handler type {type!r} is a built-in type of secure_ws; choose another name")
        if type in self.handlers:
            raise RegistrationError(f"handler type {type!r} is registered twice ({_where(self.handlers[type].func)} and {_where(func)})")
        if stream and not inspect.isasyncgenfunction(func):
            raise RegistrationError(f"stream {type!r} ({_where(func)}) must be an `async def` generator (a function that yields)")
        if not stream and not inspect.iscoroutinefunction(func):
            hint = "; a generator that yields chunks is registered with @api.stream" if inspect.isasyncgenfunction(func) else ""
            raise RegistrationError(f"handler {type!r} ({_where(func)}) must be an `async def` function{hint}")
        params = [p for p in inspect.signature(func).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(params) != 2:
            raise RegistrationError(f"handler {type!r} ({_where(func)}) must take two arguments: (ctx, data)")
        if scope is not None and (not isinstance(scope, str) or not scope or len(scope) > MAX_SCOPE_CHARS or " " in scope or "*" in scope):
            raise RegistrationError(f"handler {type!r}: scope= must be one scope name without spaces or '*', at most {MAX_SCOPE_CHARS} characters")
        items: tuple[RateLimitItem, ...] = ()
        if rate_limit is not None:
            try:
                items = tuple(parse_many(rate_limit))
            except (ValueError, TypeError):
                items = ()
            if not items:
                raise RegistrationError(f"handler {type!r}: rate_limit={rate_limit!r} is not a rate limit (use e.g. 5/minute)")
        handler = Handler(type, func, scope, items, _validator(type, func, params[1].name), stream=stream)
        self.handlers[type] = handler
        return handler

    def hook(self, hooks: list[HookFunc], func: HookFunc, name: str) -> HookFunc:
        self._check_open(name)
        if not inspect.iscoroutinefunction(func):
            raise RegistrationError(f"{name} hook {_where(func)} must be an `async def` function taking (ctx)")
        hooks.append(func)
        return func

    def channel_rule(self, pattern: str, options: dict[str, Any]) -> Rule:
        self._check_open(f"channels({pattern!r})")
        try:
            declared = rule({"pattern": pattern, **{k: v for k, v in options.items() if v is not None}}, f"channels({pattern!r})")
        except ValueError as exc:
            raise RegistrationError(str(exc)) from None
        self.channels.append(declared)
        return declared

    def channel_hook(self, hooks: list[tuple[str, ChannelHook]], pattern: str, func: ChannelHook, name: str, arity: int) -> ChannelHook:
        self._check_open(name)
        try:
            rule({"pattern": pattern}, f"{name}({pattern!r})")
        except ValueError as exc:
            raise RegistrationError(str(exc)) from None
        params = [p for p in inspect.signature(func).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not inspect.iscoroutinefunction(func) or len(params) != arity:
            names = "(ctx, channel)" if arity == 2 else "(ctx, channel, data)"
            raise RegistrationError(f"{name} hook {_where(func)} must be an `async def` function taking {names}")
        hooks.append((pattern, func))
        return func

    def _check_open(self, what: str) -> None:
        if self.frozen:
            raise RegistrationError(f"{what}: register handlers and hooks before the app starts serving")


def _where(func: Any) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"


def _validator(type: str, func: HandlerFunc | StreamFunc, name: str) -> Callable[[Any], Any] | None:
    """The pydantic model ``data`` is annotated with, as a validating function; None for any other annotation."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is None:  # a model can only be annotated by a module that imported pydantic
        return None
    try:
        hint = typing.get_type_hints(func).get(name)
    except Exception as exc:  # noqa: BLE001 (any unresolvable annotation is the same mistake)
        raise RegistrationError(f"handler {type!r} ({_where(func)}): its annotations do not resolve: {exc}") from None
    if not (inspect.isclass(hint) and issubclass(hint, pydantic.BaseModel)):
        return None
    model: Any = hint
    error_class = pydantic.ValidationError

    def validate(data: Any) -> Any:
        try:
            return model.model_validate(data)
        except error_class as exc:
            raise ProtocolError(BAD_REQUEST, "invalid data: " + _fields(exc.errors(include_url=False, include_input=False))) from None

    return validate


def _fields(errors: list[Any]) -> str:
    """``items.0.qty (int_parsing), name (missing)``: where and what kind, never the value sent. A location
    part that is not a plain name (a client's own key, say) shows as ``?``."""
    named = []
    for error in errors[:MAX_FIELDS_NAMED]:
        loc = ".".join(str(p) if type(p) is int or (type(p) is str and _FIELD.fullmatch(p)) else "?" for p in error.get("loc", ())[:8])
        kind = error.get("type", "")
        named.append(f"{loc or 'data'} ({kind if _FIELD.fullmatch(kind or '-') else 'invalid'})")
    more = len(errors) - MAX_FIELDS_NAMED
    return ", ".join(named) + (f" and {more} more" if more > 0 else "")
