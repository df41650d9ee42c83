"""Server-API keys (SPEC §10): the file of their hashes, written by ``secure-ws apikey`` and watched by the server.

``SECURE_WS_API_KEYS_FILE`` (default ``certs/api-keys.json``, 0600, written atomically)
holds ``{"keys": {NAME: {"sha256": HEX, "created": EPOCH}}}``: the SHA-256 of each
key, never the key. A key is 32 random bytes, so a plain hash is enough — there is no
password to guess from it and no need for a slow KDF.

The server keeps the current hashes in :class:`ApiKeyChecker`, re-read within 2 s of a
change (and on SIGHUP), off the event loop. It never fails open: a file that exists but
cannot be read or parsed after start-up makes every API call refused (``problem``) until
it can be read again; at start-up it is a configuration error.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import UntrustedFile, change_stamp, locked, read_trusted, shown, write_json

log = logging.getLogger("secure_ws.api_keys")

VARIABLE = "SECURE_WS_API_KEYS_FILE"
KEY_PREFIX = "swk_"
KEY_BYTES = 32
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # no leading "-": it would read as an option
# An operator-written file, but the server reads it: bounded like the JWK Set.
MAX_FILE_BYTES = 1 << 20
POLL_INTERVAL = 0.5


class ApiKeyError(Exception):
    pass


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str  # hex
    created: int


def digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def parse(document: Any) -> dict[str, ApiKey]:
    """The keys of a keys-file document, or :class:`ApiKeyError` for anything malformed."""
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, dict):
        raise ApiKeyError('not an API keys file (expected {"keys": {NAME: {"sha256": …, "created": …}}})')
    parsed: dict[str, ApiKey] = {}
    for name, entry in keys.items():
        hexdigest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(hexdigest, str) or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
            raise ApiKeyError(f"key {name[:64]!r}: missing or malformed sha256")
        created = entry.get("created", 0)
        if type(created) is not int:
            raise ApiKeyError(f"key {name[:64]!r}: created is not an integer")
        parsed[name] = ApiKey(name, hexdigest, created)
    return parsed


def read_file(path: Path) -> dict[str, ApiKey] | None:
    """Blocking. The keys, ``None`` if the file does not exist, :class:`ApiKeyError` if it cannot be used."""
    try:
        raw = read_trusted(path, MAX_FILE_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ApiKeyError(f"{shown(path)}: {exc.strerror or exc}") from None
    except UntrustedFile as exc:
        raise ApiKeyError(f"{shown(path)}: {exc}") from None
    try:
        return parse(json.loads(raw))
    except (ValueError, RecursionError) as exc:
        raise ApiKeyError(f"{shown(path)}: {exc}") from None


class ApiKeyFile:
    """The ops side: read-modify-write of the file under its lock (``secure-ws apikey …``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, ApiKey]:
        return read_file(self.path) or {}

    def _save(self, keys: dict[str, ApiKey]) -> None:
        document = {"keys": {k.name: {"sha256": k.sha256, "created": k.created} for k in keys.values()}}
        write_json(self.path, document, mode=0o600)

    def create(self, name: str) -> str:
        """A new key named ``name``: its hash is stored, the key itself returned (and shown) once."""
        if not NAME.fullmatch(name):
            raise ApiKeyError(f"a key name must match ^{NAME.pattern}$")
        key = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)
        with locked(self.path):
            keys = self._load()
            if name in keys:
                raise ApiKeyError(f"a key named {name!r} exists (revoke it first, or choose another name)")
            keys[name] = ApiKey(name, digest(key.encode()).hex(), int(time.time()))
            self._save(keys)
        return key

    def list(self) -> list[ApiKey]:
        return sorted(self._load().values(), key=lambda k: (k.created, k.name))

    def revoke(self, name: str) -> None:
        with locked(self.path):
            keys = self._load()
            if name not in keys:
                raise ApiKeyError(f"no key named {name[:64]!r}")
            del keys[name]
            self._save(keys)


class ApiKeyChecker:
    """The server side: the current hashes, kept fresh by :meth:`run`, and the constant-time check."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problem: str | None = None  # why the file cannot be used now: every API call is refused
        self._digests: tuple[tuple[str, bytes], ...] = ()
        self._stamp: tuple[int, int, int, int] | None = None

    @property
    def enabled(self) -> bool:
        """Whether ``/api/*`` exists: some key is configured, or the file is there but unusable (then 503)."""
        return bool(self._digests) or self.problem is not None

    def load_initial(self) -> None:
        """Blocking, at start-up: an unusable file is :class:`ApiKeyError` (a configuration error)."""
        self._stamp = change_stamp(self.path)
        self._use(read_file(self.path))

    def _use(self, keys: dict[str, ApiKey] | None) -> None:
        before = len(self._digests)
        self._digests = tuple((k.name, bytes.fromhex(k.sha256)) for k in (keys or {}).values())
        if len(self._digests) != before:
            log.info("api keys: %d configured (%s)", len(self._digests), self.path)

    async def poll(self, force: bool = False) -> None:
        try:
            stamp = await asyncio.to_thread(change_stamp, self.path)
            if stamp == self._stamp and not force and self.problem is None:
                return
            self._stamp = stamp
            keys = await asyncio.to_thread(read_file, self.path)
        except (OSError, ApiKeyError) as exc:
            problem = str(exc)
            if problem != self.problem:
                log.error("api keys: cannot use %s (%s); refusing every /api call (503) until it can be read", VARIABLE, problem)
            self.problem = problem
            return
        if self.problem is not None:
            log.warning("api keys: %s can be read again", self.path)
            self.problem = None
        self._use(keys)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                await self.poll()
            except Exception:  # a watcher that dies silently would freeze the keys forever
                log.exception("api keys: reload failed; will retry")

    def check(self, presented: bytes) -> str | None:
        """The name of the key ``presented`` is, or None. Compared with every stored hash in constant time,
        without stopping at a match, so the answer's timing says nothing about which hash or how much matched."""
        candidate = digest(presented)
        found = None
        for name, stored in self._digests:
            if hmac.compare_digest(candidate, stored):
                found = name
        return found
