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

from .hub import Hub
from .keys import KeyringError, KeyStore
from .ratelimit import Limiter
from .revocation import Revocations
from .settings import ConfigError, Settings
from .storage import MemoryStorage, storage_from_url
from .tokens import REVOKED, AuthError, Principal, Verifier

log = logging.getLogger("secure_ws")


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
        self.revocations = Revocations()
        if isinstance(self.storage, MemoryStorage):
            try:
                self.revocations = self.storage.read_revocations()
            except (OSError, ValueError) as exc:
                raise ConfigError("SECURE_WS_REVOCATION_FILE", str(exc)) from None
        errors = self.storage.errors
        strategy, limiter_storage = settings.rate_limit_strategy, self.storage.limiter_storage
        self.limiter = Limiter(settings.rate_limits, strategy, limiter_storage, "msg", errors)
        self.handshake_limiter = Limiter(settings.handshake_rate_limits, strategy, limiter_storage, "hs", errors)
        self.hub = Hub(self.storage)
        self.storage.on_revocations = self._revocations_changed
        self.keys.on_change(self.hub.enforce_keyring)
        self._tasks: list[asyncio.Task[Any]] = []

    async def authenticate(self, token: str) -> Principal:
        principal = await self.verifier.verify(token)
        if self.revocations.covers(principal):
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

    def _revocations_changed(self, revocations: Revocations) -> None:
        self.revocations = revocations
        self.hub.enforce_revocations(revocations)

    def _sighup(self) -> None:
        log.info("SIGHUP: reloading keys and revocations")
        self._tasks.append(asyncio.get_running_loop().create_task(self.keys.reload_file(force=True)))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        await self.storage.start()
        self.revocations = await self.storage.load_revocations()
        self._tasks.append(asyncio.create_task(self.keys.run(), name="secure-ws keyring"))
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self._sighup)
        try:
            yield
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)
            self.hub.close_all(1001, "server shutting down")
            for task in self._tasks:
                task.cancel()
            await self.storage.close()
