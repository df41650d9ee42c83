"""The wired runtime of one process: keys, verifier, storage, limiters, live connections.

Built synchronously by :func:`secure_ws.app.create_app` so that configuration
mistakes surface before the server listens; started and stopped by the ASGI
lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from collections.abc import AsyncIterator
from typing import Any

from .auth.keys import KeyringError, KeyStore
from .auth.tokens import AuthError, Principal, Verifier
from .core.hub import Hub
from .core.ratelimit import Limiter
from .settings import ConfigError, Settings
from .state.url import storage_from_url
from .wire.closes import REVOKED, SHUTTING_DOWN, Close

log = logging.getLogger("secure_ws")


class RevocationsUnavailable(Exception):
    """The revocation list may be incomplete (its file unreadable, Redis not read yet): refuse, retry later."""


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
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
        self.storage = storage_from_url(settings.storage_url, settings.revocation_file)
        try:
            self.storage.load_initial()
        except (OSError, ValueError) as exc:
            raise ConfigError("SECURE_WS_REVOCATION_FILE", str(exc)) from None
        errors = self.storage.errors
        # What makes a request wait rather than fail: storage unreachable, or a revocation list not known complete.
        self.unavailable: tuple[type[BaseException], ...] = (RevocationsUnavailable, *errors)
        strategy, limiter_storage = settings.rate_limit_strategy, self.storage.limiter_storage
        self.limiter = Limiter(settings.rate_limits, strategy, limiter_storage, "msg", errors)
        self.handshake_limiter = Limiter(settings.handshake_rate_limits, strategy, limiter_storage, "hs", errors)
        self.hub = Hub(self.storage)
        self.storage.on_revocations = self.hub.enforce_revocations
        self.keys.on_change(self.hub.enforce_keyring)
        self._tasks: list[asyncio.Task[Any]] = []

    async def authenticate(self, token: str) -> Principal:
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

    async def ready(self) -> bool:
        """For ``/readyz``: storage answers and the revocation list is known complete."""
        if self.storage.revocations_problem is not None:
            return False
        try:
            return await self.storage.ping()
        except Exception:
            return False

    def _sighup(self) -> None:
        log.info("SIGHUP: reloading keys and revocations")
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.keys.reload_file(force=True)))
        self._tasks.append(loop.create_task(self.storage.reload_revocations()))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        await self.storage.start()
        self._tasks.append(asyncio.create_task(self.keys.run(), name="secure-ws keyring"))
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self._sighup)
        try:
            yield
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)
            self.hub.close_all(Close.GOING_AWAY, SHUTTING_DOWN)
            for task in self._tasks:
                task.cancel()
            await self.storage.close()
