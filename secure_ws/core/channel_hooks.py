"""``@api.on_subscribe(pattern)`` and ``@api.on_publish(pattern)``: the application's say on a client's subscribe
and publish, run after the scope check and the channel's options (SPEC §17).

Every hook whose pattern matches the channel runs, in the order registered; the first refusal ends it. A
subscribe hook's return value (the last one not None) goes to the client as ``"data"`` in ``subscribed``; a publish
hook's return value (when not None) replaces the data published, and the next hook sees the replaced data.
Each hook runs within ``SECURE_WS_HANDLER_TIMEOUT``: past it the request is answered ``timeout`` (``unavailable``
for the RPC proxy's ``$subscribe``/``$publish``); ``Reject`` is answered with its code; anything else raised is
``internal_error`` with the traceback in the log. The connection stays in every case.

Which hooks match a channel is found once per channel and remembered (at most ``CACHE_SIZE`` channels, emptied
and refilled past that): a subscribe without hooks costs one dict lookup.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..auth.scopes import Glob
from ..state.channel_options import CACHE_SIZE
from ..wire.messages import UNAVAILABLE, ProtocolError
from .reject import INTERNAL_ERROR, Reject

log = logging.getLogger("secure_ws.session")

# (ctx, channel) for subscribe, (ctx, channel, data) for publish.
ChannelHook = Callable[..., Awaitable[Any]]
Hooks = tuple[tuple[ChannelHook, str], ...]  # the hooks that match one channel, each with its timeout code


class HookFailed(Exception):
    """A hook that could not answer for a reason of its own making (the RPC proxy unreachable): ``unavailable``."""


_TIMED_OUT = "secure_ws: hook timeout"  # the cancel message of a hook past its deadline


class ChannelHooks:
    """The hooks of one kind (subscribe or publish), by channel pattern, and their deadlines.

    A hook's deadline costs no timer of its own (``asyncio.timeout`` made one per call, most of a fast hook's
    cost): the task running it is noted with its deadline in ``_running`` (bound: one entry per task running a
    hook, i.e. per connection at most), and one timer, armed only while hooks run, cancels whatever is late."""

    __slots__ = ("_hooks", "_cache", "_timeout", "_running", "_watchdog")

    def __init__(self, hooks: list[tuple[str, ChannelHook, str]], timeout: float) -> None:
        # (pattern, hook, code on timeout) in registration order; the pattern as a Glob.
        self._hooks = tuple((Glob(pattern), hook, code) for pattern, hook, code in hooks)
        self._cache: dict[str, Hooks] = {}  # bound: CACHE_SIZE entries
        self._timeout = timeout
        self._running: dict[asyncio.Task[Any], float] = {}  # task → deadline (loop time); -1 once timed out
        self._watchdog: asyncio.TimerHandle | None = None

    def for_channel(self, channel: str) -> Hooks:
        """The hooks (with their timeout code) for ``channel``: () when none matches, as for most channels."""
        if not self._hooks:
            return ()
        found = self._cache.get(channel)
        if found is None:
            found = tuple((hook, code) for glob, hook, code in self._hooks if glob.matches(channel))
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[channel] = found
        return found

    async def run(self, hooks: Hooks, id: Any, name: str, ctx: Any, *args: Any) -> Any:
        """Run ``hooks`` on ``(ctx, *args)``; returns the last value not None (None if none); raises
        :class:`ProtocolError` with ``id`` for a refusal, a fault, or a timeout."""
        result = None
        task = asyncio.current_task()
        assert task is not None
        running = self._running
        for hook, timeout_code in hooks:
            loop = asyncio.get_running_loop()
            running[task] = loop.time() + self._timeout
            if self._watchdog is None:
                self._watchdog = loop.call_at(running[task], self._expire)
            try:
                value = await hook(ctx, *args)
                if running.get(task) == -1.0:  # it caught its cancellation and answered anyway: still late
                    raise asyncio.CancelledError(_TIMED_OUT)
            except asyncio.CancelledError:
                if running.get(task) != -1.0:
                    raise  # the connection is closing
                task.uncancel()
                log.warning("session %s: %s hook timed out", ctx.connection_id, name, extra={"event": "handler_timeout"})
                raise ProtocolError(timeout_code, f"no answer within {self._timeout:g}s", id) from None
            except Reject as exc:
                raise ProtocolError(exc.code, exc.message, id) from None
            except HookFailed as exc:
                log.warning("session %s: %s hook: %s", ctx.connection_id, name, exc, extra={"event": "proxy_unavailable"})
                raise ProtocolError(UNAVAILABLE, "backend unavailable; retry shortly", id) from None
            except Exception as exc:  # noqa: BLE001 (the application's fault: this request fails, the connection stays)
                log.error("session %s: %s hook raised", ctx.connection_id, name, exc_info=exc, extra={"event": "hook_fault"})
                raise ProtocolError(INTERNAL_ERROR, "internal error", id) from None
            finally:
                running.pop(task, None)
            if value is not None:
                result = value
                if name == "on_publish":
                    args = (args[0], value)  # the next hook sees what would now be published
        return result

    def _expire(self) -> None:
        """Cancel the hooks past their deadline; re-arm for the earliest other one, if any is running."""
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        earliest = None
        for task, deadline in self._running.items():
            if deadline == -1.0:
                continue
            if deadline <= now:
                self._running[task] = -1.0
                task.cancel(_TIMED_OUT)
            elif earliest is None or deadline < earliest:
                earliest = deadline
        if earliest is not None:
            self._watchdog = loop.call_at(earliest, self._expire)
