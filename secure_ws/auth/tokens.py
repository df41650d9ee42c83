"""Token verification (RFC 8725) → a :class:`Principal`, or an :class:`AuthError` with a SPEC reason.

The order matters: the header is only used to pick a key by ``kid``; the
algorithm must then equal the one bound to that key; only after the signature
holds are the claims looked at, so an expired *forgery* reads ``invalid token``,
never ``token expired``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import jwt

from ..settings import Settings
from ..wire.closes import EXPIRED, INVALID
from .keys import KeyStore

MAX_TOKEN_CHARS = 8192
MAX_SUB_CHARS = 256
_JWS_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# Headers that point at keys the attacker controls; a legitimate token here never needs them.
_UNTRUSTED_HEADERS = ("jwk", "jku", "x5u", "x5c")
_REQUIRED_CLAIMS = ["exp", "iat", "sub", "iss", "aud"]
CACHE_SIZE = 4096



class AuthError(Exception):
    """``reason`` goes to the client (a fixed SPEC string); ``detail`` only to the server log."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Principal:
    sub: str
    exp: int
    iat: float
    jti: str | None
    kid: str | None
    scopes: tuple[str, ...] = field(default=())
    # Every claim, read-only all the way down (a Principal is cached and shared by connections of one token).
    claims: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)


def frozen(value: Any) -> Any:
    """JSON as read-only: objects become mapping proxies, arrays tuples. Bounded by the token's size."""
    if type(value) is dict:
        return MappingProxyType({k: frozen(v) for k, v in value.items()})
    if type(value) is list:
        return tuple(frozen(v) for v in value)
    return value


def thawed(value: Any) -> Any:
    """For JSON encoders: a mapping proxy back to a dict (``orjson.dumps(..., default=thawed)``)."""
    if isinstance(value, MappingProxyType):
        return dict(value)
    raise TypeError


def _scopes(claims: dict) -> tuple[str, ...]:
    scope = claims.get("scope", claims.get("scp"))
    if isinstance(scope, str):
        return tuple(scope.split())
    if isinstance(scope, list):
        return tuple(s for s in scope if isinstance(s, str))
    return ()


class Verifier:
    """Verifies tokens, remembering recent successes.

    Devices reconnect with the token they hold (network flaps, app restarts), so
    a verified token is cached by its exact text until its ``exp`` (+ leeway):
    the same bytes, signature included, verify the same way until then. Only
    successes are cached; any keyring change empties the cache, and revocation is
    checked by the caller on every handshake, cached or not.
    """

    def __init__(self, settings: Settings, keys: KeyStore) -> None:
        self.settings = settings
        self.keys = keys
        self._jwt = jwt.PyJWT()
        # exp is checked here, after the NumericDate type check: PyJWT's int() would read `true` as 1
        # and "5" as 5, and answer such a token "token expired" instead of "invalid token".
        self._options: Any = {"require": _REQUIRED_CLAIMS, "verify_sub": True, "verify_jti": True, "verify_exp": False}
        self._cache: dict[str, Principal] = {}
        keys.on_change(lambda old, new: self._cache.clear())

    async def verify(self, token: str) -> Principal:
        principal = self._cache.get(token)
        if principal is not None:
            if time.time() < principal.exp + self.settings.leeway:
                return principal
            del self._cache[token]
        principal = await self._verify(token)
        if len(self._cache) >= CACHE_SIZE:
            del self._cache[next(iter(self._cache))]  # oldest first: dicts keep insertion order
        self._cache[token] = principal
        return principal

    async def _verify(self, token: str) -> Principal:
        header = self._header(token)
        kid = header.get("kid")
        key = self.keys.keyring.get(kid)
        if key is None and kid is not None and await self.keys.refresh_url():
            key = self.keys.keyring.get(kid)
        if key is None:
            raise AuthError(INVALID, f"no key for kid {kid[:64]!r}" if kid is not None else "token has no kid")
        return self.check(token, header, key)

    def _header(self, token: str) -> dict:
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError(INVALID, f"token longer than {MAX_TOKEN_CHARS} characters")
        if not _JWS_COMPACT.fullmatch(token):
            raise AuthError(INVALID, "not a compact JWS (three base64url parts, signature non-empty)")
        try:
            header = jwt.get_unverified_header(token)
        except Exception as exc:
            raise AuthError(INVALID, f"bad header: {exc.__class__.__name__}") from None
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError(INVALID, "kid is not a string")
        for name in _UNTRUSTED_HEADERS:
            if name in header:
                raise AuthError(INVALID, f"header carries {name!r}; keys are never taken from a token")
        return header

    def check(self, token: str, header: dict, key) -> Principal:  # noqa: ANN001 (VerificationKey)
        alg = header.get("alg")
        if alg != key.algorithm:
            raise AuthError(INVALID, f"alg {str(alg)[:20]!r} does not match key {key.kid!r} bound to {key.algorithm}")
        s = self.settings
        try:
            claims = self._jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway,
                options=self._options,
            )
        except Exception as exc:  # every malformed input is just an invalid token
            raise AuthError(INVALID, f"{exc.__class__.__name__}: {str(exc)[:120]}") from None
        sub = claims["sub"]
        if not sub or len(sub) > MAX_SUB_CHARS:
            raise AuthError(INVALID, "sub empty or too long")
        for name in ("exp", "iat", "nbf"):
            # RFC 7519 NumericDate is a finite JSON number; PyJWT alone would also take "1795260012" or
            # true (bool is a subclass of int, hence type() and not isinstance()); its json.loads reads
            # NaN and Infinity, which no JSON encoder writes. Ints are always finite (and may be too big
            # for a float, so they are not passed to isfinite).
            value = claims.get(name, 0)
            if not (type(value) is int or type(value) is float and math.isfinite(value)):
                raise AuthError(INVALID, f"{name} is not a number")
        exp = int(claims["exp"])
        if exp <= time.time() - s.leeway:  # PyJWT's own rule, run only once the type is known good
            raise AuthError(EXPIRED, "exp has passed")
        iat = float(claims["iat"])  # PyJWT refused an iat in the future, so it fits a float
        # In ints: an exp of 10**400 is a valid JSON number but too big for float arithmetic.
        if exp - int(iat) > s.max_token_ttl + s.leeway:
            raise AuthError(INVALID, f"lifetime (exp - iat) exceeds SECURE_WS_JWT_MAX_TTL ({s.max_token_ttl}s)")
        try:
            view = frozen(claims)
        except RecursionError:  # only a signed token gets here, but its issuer may still be careless
            raise AuthError(INVALID, "claims nested too deeply") from None
        return Principal(sub=sub, exp=exp, iat=iat, jti=claims.get("jti"), kid=key.kid, scopes=_scopes(claims), claims=view)
