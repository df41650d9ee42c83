"""The verification keyring: JWK Sets from a file and an identity provider, reloaded live.

RFC 8725 §3.1: every key is bound to exactly one algorithm when it is loaded —
its JWK ``alg``, or the one its type implies, and only if the allow-list names
it. Tokens never choose the algorithm; they may only name a ``kid``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jwt import PyJWK
from jwt.exceptions import PyJWKError

from .. import metrics
from ..files import UntrustedFile, fingerprint, read_trusted, shown
from ..settings import HMAC_ALGORITHMS, Settings

log = logging.getLogger("secure_ws.keys")

# A JWK Set holds a few public keys: an RSA-4096 key is under 1 KiB as JSON, so 64 KiB is dozens of keys
# (an identity provider's set with certificate chains is some 20 KiB). Larger is refused, not read.
MAX_JWKS_BYTES = 64 << 10
URL_REFRESH_INTERVAL = 600.0
UNKNOWN_KID_REFETCH_INTERVAL = 30.0
POLL_INTERVAL = 0.5

_ALG_BY_CURVE = {"Ed25519": "EdDSA", "Ed448": "EdDSA", "P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_PUBLIC_MEMBERS = {
    "OKP": ("kty", "crv", "x"),
    "EC": ("kty", "crv", "x", "y"),
    "RSA": ("kty", "n", "e"),
}


class KeyringError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str | None
    algorithm: str
    key: Any
    public_jwk: Mapping[str, Any] | None = None


def _material(key: VerificationKey) -> tuple[str, str]:
    return key.algorithm, repr(sorted((key.public_jwk or {}).items()))


class Keyring:
    """An immutable kid → key map; a reload builds a new one and swaps it in."""

    def __init__(self, keys: Iterable[VerificationKey] = ()) -> None:
        self._by_kid: dict[str | None, VerificationKey] = {}
        for key in keys:
            self._by_kid.setdefault(key.kid, key)

    def get(self, kid: str | None) -> VerificationKey | None:
        return self._by_kid.get(kid)

    def __len__(self) -> int:
        return len(self._by_kid)

    def kids(self) -> set[str | None]:
        return set(self._by_kid)

    def identity(self) -> frozenset[tuple[str | None, str, str]]:
        """What makes two keyrings verify differently: kid, algorithm and key material."""
        return frozenset((k.kid, *_material(k)) for k in self._by_kid.values())

    def invalidated_by(self, new: Keyring) -> set[str | None]:
        """Kids whose key ``new`` drops *or replaces*: a token verified with the old material is unproven now."""
        return {
            kid for kid, key in self._by_kid.items() if (other := new.get(kid)) is None or _material(other) != _material(key)
        }

    def public_jwks(self) -> dict[str, list[dict[str, Any]]]:
        return {"keys": [dict(k.public_jwk) for k in self._by_kid.values() if k.public_jwk is not None]}


def _algorithm_for(jwk: Mapping[str, Any], allowed: tuple[str, ...]) -> str:
    kty = jwk.get("kty")
    alg = jwk.get("alg")
    if kty not in _PUBLIC_MEMBERS:
        raise KeyringError(f"key type {kty!r} is not accepted in a JWK Set (only OKP, EC, RSA)")
    if alg is None:
        if kty == "RSA":
            alg = next((a for a in allowed if a in _RSA_ALGS), None)
        else:
            alg = _ALG_BY_CURVE.get(jwk.get("crv"))  # type: ignore[arg-type]
    if not isinstance(alg, str) or alg in HMAC_ALGORITHMS or alg not in allowed:
        raise KeyringError(f"algorithm {alg!r} is not in SECURE_WS_JWT_ALGORITHMS")
    if jwk.get("use", "sig") != "sig":
        raise KeyringError(f"use {jwk.get('use')!r} is not 'sig'")
    ops = jwk.get("key_ops")
    if ops is not None and "verify" not in ops:
        raise KeyringError("key_ops does not allow 'verify'")
    return alg


def parse_jwks(document: Any, allowed: tuple[str, ...], source: str) -> list[VerificationKey]:
    """Keys of a JWK Set that are usable here; unusable keys are logged and skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeyringError("not a JWK Set (expected an object with a 'keys' list)")
    keys: list[VerificationKey] = []
    for jwk in document["keys"]:
        if not isinstance(jwk, dict):
            raise KeyringError("a member of 'keys' is not an object")
        kid = jwk.get("kid")
        try:
            if not isinstance(kid, str) or not 0 < len(kid) <= 256:
                raise KeyringError("missing or bad 'kid'")
            alg = _algorithm_for(jwk, allowed)
            public = {m: jwk[m] for m in _PUBLIC_MEMBERS[jwk["kty"]] if m in jwk}
            parsed = PyJWK(public, algorithm=alg)
            if jwk["kty"] == "RSA" and parsed.key.key_size < 2048:
                raise KeyringError(f"RSA key of {parsed.key.key_size} bits is too short (2048 minimum)")
        except (KeyringError, PyJWKError, KeyError, TypeError, ValueError) as exc:
            log.warning("jwks %s: skipping key %r: %s", source, kid, exc)
            continue
        keys.append(
            VerificationKey(
                kid=kid,
                algorithm=alg,
                key=parsed.key,
                public_jwk={**public, "kid": kid, "alg": alg, "use": "sig"},
            )
        )
    return keys


def read_jwks_file(path: Path, allowed: tuple[str, ...]) -> list[VerificationKey]:
    try:
        raw = read_trusted(path, MAX_JWKS_BYTES)
    except FileNotFoundError:
        raise KeyringError(f"{shown(path)} not found (create one with `secure-ws keys rotate`)") from None
    except OSError as exc:
        raise KeyringError(f"{shown(path)}: {exc.strerror}") from None
    except UntrustedFile as exc:
        raise KeyringError(f"{shown(path)}: {exc}") from None
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise KeyringError(f"{shown(path)} is not valid JSON: {exc}") from None
    return parse_jwks(document, allowed, "file")


def fetch_jwks_url(url: str, allowed: tuple[str, ...], timeout: float = 5.0) -> list[VerificationKey]:
    """Blocking fetch; always called in a worker thread."""
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "secure-ws"})
    context = ssl.create_default_context()
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310 (https only)
            raw = response.read(MAX_JWKS_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise KeyringError(f"fetching {url}: {exc}") from None
    if len(raw) > MAX_JWKS_BYTES:
        raise KeyringError(f"{url}: JWK Set larger than {MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise KeyringError(f"{url} is not valid JSON: {exc}") from None
    return parse_jwks(document, allowed, "url")


def secret_key(settings: Settings) -> list[VerificationKey]:
    if settings.jwt_secret is None:
        return []
    alg = next(a for a in settings.algorithms if a in HMAC_ALGORITHMS)
    # A shared secret has no kid: it is tried only for tokens without one, and never published.
    return [VerificationKey(kid=None, algorithm=alg, key=settings.jwt_secret)]


class KeyStore:
    """Holds the current :class:`Keyring` and keeps it fresh.

    The file is polled (stat in a worker thread) and re-read when it changes, or
    at once on SIGHUP; the IdP URL is refetched periodically and when a token
    names an unknown ``kid`` — at most once per 30 s, so forged kids cannot turn
    handshakes into a fetch storm. A bad new file or a failed fetch keeps the
    last good keys and logs one line.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Why the file's last change could not be used (the last good keys are kept meanwhile, but a key
        # it retires still verifies): /readyz answers 503 until it can be used.
        self.problem: str | None = None
        self._file_keys: list[VerificationKey] = []
        self._url_keys: list[VerificationKey] = []
        self._file_print: tuple[int, int, int] | None = None
        self._last_url_fetch = float("-inf")
        self._url_fetch: asyncio.Future[bool] | None = None
        self._listeners: list[Callable[[Keyring, Keyring], None]] = []
        self.keyring = Keyring(secret_key(settings))

    def on_change(self, listener: Callable[[Keyring, Keyring], None]) -> None:
        self._listeners.append(listener)

    def load_initial(self) -> None:
        """Synchronous first load at start-up; errors here are configuration errors."""
        s = self.settings
        if s.jwks_file_required or s.jwks_file.exists():
            self._file_print = fingerprint(s.jwks_file)
            self._file_keys = read_jwks_file(s.jwks_file, s.algorithms)
        if s.jwks_url:
            try:
                self._url_keys = fetch_jwks_url(s.jwks_url, s.algorithms)
            except KeyringError as exc:
                # An IdP briefly down must not stop the service; the next refresh retries.
                log.error("jwks url: %s; starting without its keys", exc)
            self._last_url_fetch = time.monotonic()
        self._rebuild()

    def _rebuild(self) -> None:
        old = self.keyring
        self.keyring = Keyring([*self._file_keys, *self._url_keys, *secret_key(self.settings)])
        if old.identity() != self.keyring.identity():
            log.info("keyring: %d keys (%s)", len(self.keyring), ", ".join(sorted(str(k) for k in self.keyring.kids())))
            for listener in self._listeners:
                listener(old, self.keyring)

    async def reload_file(self, force: bool = False) -> None:
        s = self.settings
        current = await asyncio.to_thread(fingerprint, s.jwks_file)
        # While the file cannot be used it is read at every poll: `chmod go-w` mends it without changing its print.
        if current == self._file_print and not force and self.problem is None:
            return
        self._file_print = current
        try:
            if current is None and not s.jwks_file_required:
                keys: list[VerificationKey] = []
            else:
                keys = await asyncio.to_thread(read_jwks_file, s.jwks_file, s.algorithms)
        except KeyringError as exc:
            if str(exc) != self.problem:  # one line per problem, not one per poll
                metrics.KEYRING_RELOADS.labels(source="file", result="error").inc()
                log.error("jwks file: %s; keeping the last good keyring (/readyz 503 until the file can be used)", exc)
            self.problem = str(exc)
            return
        metrics.KEYRING_RELOADS.labels(source="file", result="ok").inc()
        if self.problem is not None:
            log.warning("jwks file: %s can be used again", shown(s.jwks_file))
            self.problem = None
        self._file_keys = keys
        self._rebuild()

    async def refresh_url(self) -> bool:
        """Refetch the IdP's keys unless fetched within the last 30 s; concurrent callers share one fetch."""
        url = self.settings.jwks_url
        if url is None:
            return False
        if self._url_fetch is not None:
            return await asyncio.shield(self._url_fetch)
        if time.monotonic() - self._last_url_fetch < UNKNOWN_KID_REFETCH_INTERVAL:
            return False
        self._last_url_fetch = time.monotonic()
        self._url_fetch = asyncio.get_running_loop().create_future()
        ok = False
        try:
            self._url_keys = await asyncio.to_thread(fetch_jwks_url, url, self.settings.algorithms)
            ok = True
            metrics.KEYRING_RELOADS.labels(source="url", result="ok").inc()
            self._rebuild()
        except KeyringError as exc:
            metrics.KEYRING_RELOADS.labels(source="url", result="error").inc()
            log.error("jwks url: %s; keeping the last good keys", exc)
        finally:
            self._url_fetch.set_result(ok)
            self._url_fetch = None
        return ok

    async def run(self) -> None:
        """Background task: poll the file, refresh the URL periodically."""
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                await self.reload_file()
                if self.settings.jwks_url and time.monotonic() - self._last_url_fetch > URL_REFRESH_INTERVAL:
                    await self.refresh_url()
            except Exception:  # a reloader that dies silently would freeze the keys forever
                log.exception("keyring reload failed; will retry")
