"""The revocation file (``SECURE_WS_REVOCATION_FILE``): the durable copy of the revocation list.

Written by ``secure-ws token revoke`` with every storage (under a lock, atomically,
0600) and watched by every worker, so that revocations outlive a restart of this
service *and* of Redis: Redis is the fast path between workers, the file is what
nothing but an operator can erase.

Reads report three outcomes, because they mean different things at runtime:
a list; ``None`` — the file is missing (nothing written yet, or deleted: the
revocations already known stay, :mod:`secure_ws.storage`); or an exception —
the file exists but cannot be read, so what it says is unknown and handshakes
must wait until it can be read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..files import UntrustedFile, atomic_write, change_stamp, json_bytes, locked, read_trusted, shown
from .revocation import Revocations

log = logging.getLogger("secure_ws.storage")

# The live revocations supported: entries leave the file once no token they cover can be valid
# (every write prunes them, every read ignores them). As written, an entry with an id (jti or sub)
# of up to 64 ASCII characters takes at most 160 bytes, so the cap below holds 100,000 of them (fewer
# with longer ids); a larger file is unreadable (handshakes wait, /readyz 503), and a revocation that
# would make it larger is refused: revoke the subject (--sub) instead of its tokens one by one.
MAX_LIVE_REVOCATIONS = 100_000
MAX_FILE_BYTES = 16 << 20


class RevocationsFull(ValueError):
    """A revocation that would take the file past :data:`MAX_FILE_BYTES`: refused, the file kept as it is."""


class RevocationFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.problem: str | None = None  # why the file cannot be read now, or None
        self._stamp: tuple[int, int, int, int] | None = None
        self._missing_logged = False
        self.checked_at = 0.0  # when the file was last read or seen unchanged (or missing), for the metrics

    def load_initial(self) -> Revocations:
        """Blocking, at start-up, where an unreadable file is a configuration error (OSError, ValueError)."""
        self._stamp = change_stamp(self.path)
        revocations = self.read() or Revocations()
        self.checked_at = time.time()
        return revocations

    def read(self) -> Revocations | None:
        """Blocking: call in a worker thread once the event loop runs."""
        try:
            raw = read_trusted(self.path, MAX_FILE_BYTES)
        except FileNotFoundError:
            return None
        except UntrustedFile as exc:
            raise ValueError(f"{shown(self.path)}: {exc}") from None
        try:
            return Revocations.from_json(json.loads(raw)).pruned()
        except (ValueError, TypeError, AttributeError, IndexError, RecursionError) as exc:
            raise ValueError(f"{shown(self.path)}: {exc}") from None

    def update(self, change: Callable[[Revocations], Revocations]) -> Revocations:
        """Blocking read-modify-write under the lock, so concurrent ops commands keep each other's entries."""
        with locked(self.path):
            revocations = change(self.read() or Revocations()).pruned()
            data = json_bytes(revocations.to_json())
            if len(data) > MAX_FILE_BYTES:  # the servers would refuse it: refuse it here, and keep the file
                raise RevocationsFull(
                    f"{shown(self.path)} would pass {MAX_FILE_BYTES} bytes (about {MAX_LIVE_REVOCATIONS} live revocations): "
                    "revoke the subject (--sub) instead of its tokens one by one"
                )
            atomic_write(self.path, data)
        return revocations

    async def poll(self, force: bool = False) -> Revocations | None:
        """The list if the file changed since the last poll (or ``force``), else None; sets :attr:`problem`."""
        try:
            stamp = await asyncio.to_thread(change_stamp, self.path)
            if stamp == self._stamp and not force and self.problem is None:
                self.checked_at = time.time()
                return None
            self._stamp = stamp
            revocations = await asyncio.to_thread(self.read)
        except (OSError, ValueError) as exc:
            problem = str(exc) if isinstance(exc, ValueError) else f"{shown(self.path)}: {exc.strerror or exc}"
            if problem != self.problem:
                log.error(
                    "revocations: cannot read SECURE_WS_REVOCATION_FILE (%s); refusing handshakes (1013) "
                    "and /readyz 503 until it can be read", problem,
                )
            self.problem = problem
            return None
        self.checked_at = time.time()
        if self.problem is not None:
            log.warning("revocations: %s can be read again; accepting handshakes", self.path)
            self.problem = None
        if revocations is None:
            if not self._missing_logged:
                log.warning(
                    "revocations: %s is missing; keeping the revocations already known "
                    "(the next `secure-ws token revoke` writes it again)", self.path,
                )
                self._missing_logged = True
            return None
        self._missing_logged = False
        return revocations
