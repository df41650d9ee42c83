"""The wired runtime of one process: keys, verifier, storage, limiters, live connections, and the
application's handlers.

Built synchronously (by :class:`secure_ws.SecureWS`) so that configuration
mistakes surface before the server listens; started and stopped by the ASGI
lifespan, which is also when the dispatch table is built and the handler
registry frozen. Until the lifespan has run, handshakes are refused (1013):
without it nothing watches for revocations or key changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from . import metrics
from .auth.api_keys import ApiKeyChecker, ApiKeyError
from .auth.keys import KeyringError, KeyStore
from .auth.tokens import AuthError, Principal, Verifier
from .core import dispatch
from .core.channel_hooks import ChannelHooks
from .core.handlers import Registry
from .core.hub import Hub
from .core.presence import Roster
from .core.ratelimit import Limiter
from .core.reject import TIMEOUT
from .core.types import Route, SessionDeps
from .settings import ConfigError, Settings
from .state import actions
from .state.channel_options import ChannelRules, read_file
from .state.storage import HistoryLimits, Position, StorageUnavailable
from .state.url import presence_store, storage_from_url
from .wire.closes import REVOKED, SHUTTING_DOWN, Close
from .wire.messages import UNAVAILABLE, check_channel, parse_limit, parse_since

log = logging.getLogger("secure_ws")

HEALTH_INTERVAL = 5.0  # how often each worker pings storage and samples its gauges for /metrics


NOT_STARTED = "the app's lifespan has not run (mounted in another app? pass lifespan=api.lifespan, see the README)"


class RevocationsUnavailable(Exception):
    """The revocation list may be incomplete (its file unreadable, Redis not read yet): refuse, retry later."""


async def _logged(reload: Callable[[], Awaitable[object]]) -> None:
    try:
        await reload()
    except Exception:  # one failing source must not stop the others, nor go unseen
        log.exception("SIGHUP: a reload failed")


class Service:
    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else Registry()
        self.session_deps: SessionDeps | None = None  # built when the lifespan starts
        self.keys = KeyStore(settings)
        try:
            self.keys.load_initial()
        except KeyringError as exc:
            raise ConfigError("SECURE_WS_JWKS_FILE", str(exc)) from None
        if len(self.keys.keyring) == 0:
            raise ConfigError(
                "SECURE_WS_JWKS_FILE", f"no usable key for {','.join(settings.algorithms)} (see the log lines above)"
            )
        self.verifier = Verifier(settings, self.keys)
        self.storage = storage_from_url(settings.storage_url, settings.revocation_file, HistoryLimits.of(settings))
        try:  # validated here, at start-up; the application's own rules join them when the lifespan starts
            self._file_rules = read_file(settings.channels_file) if settings.channels_file is not None else []
            self.channel_rules = ChannelRules(settings, self._file_rules)
        except ValueError as exc:
            raise ConfigError("SECURE_WS_CHANNELS_FILE", str(exc)) from None
        self.storage.history_for = self.channel_rules.history
        try:
            self.storage.load_initial()
        except (OSError, ValueError) as exc:
            raise ConfigError("SECURE_WS_REVOCATION_FILE", str(exc)) from None
        self.api_keys = ApiKeyChecker(settings.api_keys_file)
        try:
            self.api_keys.load_initial()
        except ApiKeyError as exc:
            raise ConfigError("SECURE_WS_API_KEYS_FILE", str(exc)) from None
        # What makes a request wait rather than fail: storage unreachable, or a revocation list not known complete.
        self.unavailable: tuple[type[BaseException], ...] = (RevocationsUnavailable, StorageUnavailable)
        strategy, limiter_storage = settings.rate_limit_strategy, self.storage.limiter_storage
        self.limiter = Limiter(settings.rate_limits, strategy, limiter_storage, "msg")
        self.handshake_limiter = Limiter(settings.handshake_rate_limits, strategy, limiter_storage, "hs")
        self.roster = Roster(presence_store(self.storage))
        self.hub = Hub(self.storage, self.roster)
        self.roster.store.node_stats = lambda: {"connections": len(self.hub.sessions)}
        self.storage.on_revocations = self.hub.enforce_revocations
        self.keys.on_change(self.hub.enforce_keyring)
        self._tasks: list[asyncio.Task[Any]] = []
        self._proxy: Any = None
        # What SIGHUP re-reads in this process, now (see on_reload).
        self._reloaders: list[Callable[[], Awaitable[object]]] = [
            lambda: self.keys.reload_file(force=True),
            self.storage.reload_revocations,
            lambda: self.api_keys.poll(force=True),
        ]

    def _start_dispatch(self) -> SessionDeps:
        registry, settings = self.registry, self.settings
        registry.frozen = True
        try:
            self.channel_rules = ChannelRules(settings, [*self._file_rules, *registry.channels])
        except ValueError as exc:
            raise ConfigError("SECURE_WS_CHANNELS_FILE", str(exc)) from None
        self.storage.history_for = self.channel_rules.history
        on_subscribe = [(pattern, hook, TIMEOUT) for pattern, hook in registry.on_subscribe]
        on_publish = [(pattern, hook, TIMEOUT) for pattern, hook in registry.on_publish]
        on_connect = list(registry.on_connect)
        for handler in registry.handlers.values():
            if handler.rate_limits:  # keyed by sub and type, in the shared storage: one window across workers
                handler.limiter = Limiter(
                    handler.rate_limits, settings.rate_limit_strategy, self.storage.limiter_storage, f"t:{handler.type}"
                )
        fallback: Route = dispatch.unknown_type
        if settings.rpc_proxy_url is not None and settings.rpc_proxy_secret is not None:
            from .core.rpc_proxy import RpcProxy

            self._proxy = RpcProxy(
                settings.rpc_proxy_url, settings.rpc_proxy_secret, settings.handler_timeout, max_line_bytes=settings.max_message_bytes
            )
            fallback = dispatch.proxy_route(self._proxy)
            events = settings.rpc_proxy_events
            if "subscribe" in events:
                on_subscribe.append(("*", dispatch.proxy_event(self._proxy, "$subscribe"), UNAVAILABLE))
            if "publish" in events:
                on_publish.append(("*", dispatch.proxy_event(self._proxy, "$publish"), UNAVAILABLE))
            if "connect" in events:
                on_connect.append(dispatch.proxy_event(self._proxy, "$connect"))
        return SessionDeps(
            settings=settings,
            limiter=self.limiter,
            hub=self.hub,
            routes=dispatch.routes(registry.handlers),
            fallback=fallback,
            authenticate=self.authenticate,
            publish=self.publish,
            history=self.storage.history,
            unavailable=self.unavailable,
            presence=self.roster,
            channels=self.channel_rules,
            on_subscribe=ChannelHooks(on_subscribe, settings.handler_timeout),
            on_publish=ChannelHooks(on_publish, settings.handler_timeout),
            on_connect=tuple(on_connect),
            on_disconnect=tuple(registry.on_disconnect),
        )

    async def history(self, channel: str, since: dict[str, Any] | None = None, limit: int | None = None) -> dict[str, Any]:
        """For the server API's ``history``: ``{"messages": [...], "offset": N, "epoch": E}``, the messages as the
        objects subscribers received (with ``since``: those after it, at most ``limit``; else the latest
        ``limit``; ``limit`` defaults to and is clamped to the channel's history size). With ``since`` that cannot be
        honoured (another epoch, fallen out) the messages are empty and ``"recovered": false`` is added (``true``
        when it could). ``{"messages": []}`` with history off. ``ValueError`` for a bad channel, ``since`` or
        ``limit`` (the message says which), ``StorageUnavailable`` when storage does not answer."""
        check_channel(channel)
        history = self.channel_rules.history(channel)
        size = history.size if history is not None else 0
        limit = size if limit is None else parse_limit(limit, size)
        position = None if since is None else Position(*parse_since(since))
        found = await self.storage.history(channel, position, limit)
        answer: dict[str, Any] = {"messages": [json.loads(text) for text in found.messages] if found is not None else []}
        if found is not None:
            answer["offset"], answer["epoch"] = found.offset, found.epoch
        if since is not None:
            answer["recovered"] = found is not None and found.recovered
        return answer

    async def authenticate(self, token: str) -> Principal:
        if self.session_deps is None:
            raise RevocationsUnavailable(NOT_STARTED)
        problem = self.storage.revocations_problem
        if problem is not None:
            # Never fail open: a token this process cannot prove unrevoked is not let in.
            raise RevocationsUnavailable(problem)
        principal = await self.verifier.verify(token)
        if self.storage.revocations.covers(principal):
            raise AuthError(REVOKED, f"sub {principal.sub!r} jti {principal.jti!r} is revoked")
        return principal

    async def acquire_slot(self, sub: str) -> str | None:
        slot = secrets.token_hex(8)
        if await self.storage.acquire_connection(sub, slot, self.settings.max_connections_per_client):
            return slot
        return None

    async def release_slot(self, sub: str, slot: str) -> None:
        try:
            await self.storage.release_connection(sub, slot)
        except Exception:  # storage down: the slot's lease expires by itself
            log.warning("could not release connection slot for sub %r", sub)

    # -- presence, channels and nodes (SPEC §10 `presence`, `channels`, `info`); storage errors propagate --

    async def presence(self, channel: str) -> dict[str, dict[str, str]]:
        """``{connection_id: {"sub": S}, …}``: the subscribers of ``channel`` on every node, at most 1,000."""
        listed, _ = await self.roster.clients(check_channel(channel))
        return {connection_id: {"sub": sub} for connection_id, sub in listed.items()}

    async def channels(self) -> dict[str, dict[str, int]]:
        """``{C: {"subscribers": N}, …}``: every channel with a subscriber on any node, at most 10,000."""
        return {channel: {"subscribers": n} for channel, n in (await self.roster.channels()).items()}

    async def info(self) -> dict[str, Any]:
        """``{"nodes": [{"id", "hostname", "pid", "started", "connections"}, …]}``: the live nodes, this one first."""
        return {"nodes": await self.roster.nodes()}

    async def ready(self) -> bool:
        """For ``/readyz``: started, storage answers, the revocation list is known complete and the JWK Set file usable."""
        if self.session_deps is None or self.storage.revocations_problem is not None or self.keys.problem is not None:
            return False
        return await self._ping()

    async def _ping(self) -> bool:
        try:
            up = await self.storage.ping()
        except Exception:
            up = False
        metrics.STORAGE_UP.set(1 if up else 0)
        return up

    async def _sample(self) -> None:
        """Background task: the gauges only this worker can know, for ``/metrics`` on any worker."""
        while True:
            await self._ping()
            revocations = self.storage.revocations
            metrics.REVOCATIONS_CHECKED.set(self.storage.revocations_checked_at)
            metrics.REVOCATIONS_ACTIVE.set(len(revocations.jtis) + len(revocations.subs))
            metrics.KEYRING_KEYS.set(len(self.keys.keyring))
            await asyncio.sleep(HEALTH_INTERVAL)

    # -- the server side: SecureWS.publish/send/disconnect and the server API (secure_ws.server_api) ----------

    async def publish(self, channel: str, data: Any, sender: str | None = None) -> dict[str, Any]:
        """To every subscriber of ``channel`` on every worker; ``{"offset":N,"epoch":E}``, or ``{}`` with history off
        (:func:`secure_ws.state.actions.publish`, the one publish path)."""
        return await actions.publish(self.storage, channel, data, sender)

    async def send(self, sub: str, data: Any) -> None:
        await actions.send(self.storage, sub, data)

    async def disconnect(self, sub: str) -> None:
        await actions.disconnect(self.storage, sub)

    async def revoke(self, jti: str | None = None, sub: str | None = None) -> None:
        await actions.revoke(self.storage, self.settings, jti=jti, sub=sub)

    def on_reload(self, reload: Callable[[], Awaitable[object]]) -> None:
        """Have SIGHUP (``kill -HUP``; ``secure-ws serve`` forwards it to every worker) also run
        ``await reload()`` in this process, beside the keys and revocations; no connection is closed.
        For anything read from a file the ops commands change (API keys, …)."""
        self._reloaders.append(reload)

    def _sighup(self) -> None:
        log.info("SIGHUP: reloading keys, revocations, API keys and %d registered source(s) in this process", len(self._reloaders) - 3)
        loop = asyncio.get_running_loop()
        self._tasks = [task for task in self._tasks if not task.done()]  # bounded however often SIGHUP comes
        for reload in self._reloaders:
            self._tasks.append(loop.create_task(_logged(reload)))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        deps = self._start_dispatch()
        if self._proxy is not None:
            await self._proxy.start()
        await self.storage.start()
        await self.roster.store.start()
        self._tasks.append(asyncio.create_task(self.keys.run(), name="secure-ws keyring"))
        self._tasks.append(asyncio.create_task(self.api_keys.run(), name="secure-ws api keys"))
        self._tasks.append(asyncio.create_task(self._sample(), name="secure-ws metrics sampler"))
        self._tasks.append(asyncio.create_task(metrics.flush_every(), name="secure-ws metrics flush"))
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self._sighup)
            # `secure-ws serve --workers` starts workers with SIGHUP blocked until this handler exists;
            # a HUP sent meanwhile is delivered now (elsewhere this changes nothing).
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        self.session_deps = deps
        try:
            yield
        finally:
            self.session_deps = None
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)
            self.hub.close_all(Close.GOING_AWAY, SHUTTING_DOWN)
            for task in self._tasks:
                task.cancel()
            self._tasks.clear()
            await self.roster.store.close()
            await self.storage.close()
            if self._proxy is not None:
                await self._proxy.close()
