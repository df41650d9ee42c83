"""Signing keys and token issuance for the ops commands. The server never imports this.

Two files, always written together and atomically:

* the private JWK Set (``SECURE_WS_SIGNING_KEYS_FILE``, mode 0600): every key
  with its ``created`` time and ``status`` — ``active`` (signs new tokens),
  ``previous`` (still verifies tokens it signed) or ``retired`` (private part
  erased, kept only so ``keys list`` can show its history);
* the public JWK Set (``SECURE_WS_JWKS_FILE``): the public half of every key
  that is not retired — exactly what the server verifies with.
"""

from __future__ import annotations

import base64
import builtins  # `list` is a method name in SigningKeys
import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from ..files import locked, read_json, write_json
from ..settings import Settings, parse_duration

SIGNING_ALGORITHMS = ("EdDSA", "ES256", "RS256")
ACTIVE, PREVIOUS, RETIRED = "active", "previous", "retired"
_THUMBPRINT_MEMBERS = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")


class SigningError(Exception):
    pass


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint: a kid derived from the key itself, stable and collision-free."""
    members = {m: jwk[m] for m in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def generate_jwk(alg: str) -> dict[str, Any]:
    if alg == "EdDSA":
        jwk = OKPAlgorithm.to_jwk(ed25519.Ed25519PrivateKey.generate(), as_dict=True)
    elif alg == "ES256":
        jwk = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()), as_dict=True)
    elif alg == "RS256":
        jwk = RSAAlgorithm.to_jwk(rsa.generate_private_key(public_exponent=65537, key_size=3072), as_dict=True)
    else:
        raise SigningError(f"unsupported signing algorithm {alg!r} (use one of {', '.join(SIGNING_ALGORITHMS)})")
    jwk = dict(jwk)
    jwk.update(kid=thumbprint(jwk), alg=alg, use="sig")
    return jwk


def public_part(jwk: dict[str, Any]) -> dict[str, Any]:
    keep = (*_THUMBPRINT_MEMBERS[jwk["kty"]], "kid", "alg", "use")
    return {m: jwk[m] for m in keep if m in jwk}


@dataclass
class KeyInfo:
    kid: str
    alg: str
    created: int
    status: str


class SigningKeys:
    """Read-modify-write access to the two key files under one lock."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.private_file = settings.signing_keys_file
        self.public_file = settings.jwks_file

    def _load(self) -> list[dict[str, Any]]:
        document = read_json(self.private_file, default={"keys": []})
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise SigningError(f"{self.private_file} is not a JWK Set")
        return keys

    def _save(self, keys: list[dict[str, Any]]) -> None:
        # Public first: a token signed by a new key must never reach a server that cannot verify it yet.
        public = {"keys": [public_part(k) for k in keys if k.get("status") != RETIRED]}
        write_json(self.public_file, public, mode=0o644)
        write_json(self.private_file, {"keys": keys}, mode=0o600)

    def list(self) -> list[KeyInfo]:
        return [KeyInfo(k["kid"], k["alg"], int(k.get("created", 0)), k.get("status", PREVIOUS)) for k in self._load()]

    def rotate(self, alg: str = "EdDSA") -> str:
        if alg not in self.settings.algorithms:
            raise SigningError(f"{alg} is not in SECURE_WS_JWT_ALGORITHMS; the server would refuse its tokens")
        jwk = generate_jwk(alg)
        with locked(self.private_file):
            keys = self._load()
            for key in keys:
                if key.get("status") == ACTIVE:
                    key["status"] = PREVIOUS
                    key["superseded"] = int(time.time())
            keys.append({**jwk, "created": int(time.time()), "status": ACTIVE})
            self._save(keys)
        return jwk["kid"]

    def retire(self, kid: str, force: bool = False) -> None:
        """Retire ``kid``; the active key only with ``force``: without it no token can be signed, and
        with no previous key the server has nothing to verify with (it will not start)."""
        with locked(self.private_file):
            keys = self._load()
            key = next((k for k in keys if k["kid"] == kid), None)
            if key is None:
                raise SigningError(f"no key with kid {kid!r}")
            if key.get("status") == RETIRED:
                return
            if key.get("status") == ACTIVE and not force:
                raise SigningError(
                    f"{kid} is the active signing key: retiring it leaves none to sign tokens; "
                    "run `secure-ws keys rotate` first, or pass --force"
                )
            for member in _PRIVATE_MEMBERS:
                key.pop(member, None)
            key["status"] = RETIRED
            key["retired"] = int(time.time())
            self._save(keys)

    def retire_unused(self, max_token_lifetime: int, now: float | None = None) -> builtins.list[str]:
        """Retire every previous key that cannot have signed a still-valid token.

        A key stops signing when it is superseded, so its last token expires at
        most ``max_token_lifetime`` later; counting from ``created`` instead would
        cut off tokens of a key that was active for a long time.
        """
        now = time.time() if now is None else now
        with locked(self.private_file):
            keys = self._load()
        done = [
            k["kid"]
            for k in keys
            if k.get("status") == PREVIOUS and k.get("superseded", k.get("created", 0)) + max_token_lifetime < now
        ]
        for kid in done:
            self.retire(kid)
        return done

    def active(self) -> dict[str, Any]:
        key = next((k for k in self._load() if k.get("status") == ACTIVE), None)
        if key is None:
            raise SigningError(f"no active signing key in {self.private_file} (run `secure-ws keys rotate`)")
        return key


#: Claims the issuer sets itself; ``claims=`` may not replace them.
RESERVED_CLAIMS = frozenset({"iss", "aud", "sub", "iat", "exp", "jti"})


def issue_token(
    sub: str,
    *,
    scope: str | None = None,
    ttl: int | str = "15m",
    claims: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
    now: float | None = None,
) -> str:
    """A JWT for ``sub``, signed with the active key of the signing keys file: what ``secure-ws token issue``
    prints, for backends that hand tokens to their users and for tests.

    ``scope`` is the space-separated rights (``"subscribe:room.* publish:room.lobby"``); ``ttl`` the lifetime in
    seconds or as a duration (``90s``, ``15m``, ``2h``, ``1d``), at most ``SECURE_WS_JWT_MAX_TTL``; ``claims``
    extra claims an application reads from ``ctx.claims`` (not ``iss``, ``aud``, ``sub``, ``iat``, ``exp`` or
    ``jti``, which are set here). ``settings`` defaults to the environment and ``.env``, as for the commands
    (``SECURE_WS_SIGNING_KEYS_FILE``, ``SECURE_WS_JWT_ISSUER``, ``SECURE_WS_JWT_AUDIENCE``).

    Raises :class:`SigningError` (no active key, a bad ``sub``, ``ttl`` or claim) and
    :class:`~secure_ws.settings.ConfigError` (a bad variable).
    """
    if settings is None:
        from ..settings import load_settings

        settings = load_settings()
    if isinstance(ttl, str):
        try:
            ttl = parse_duration(ttl)
        except ValueError as exc:
            raise SigningError(f"ttl: {exc}") from None
    return issue(settings, sub, ttl, scope, now, claims)[0]


def issue(
    settings: Settings, sub: str, ttl: int, scope: str | None = None, now: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """A token signed with the active key, and its header and claims (``kid``, ``jti``, ``exp`` …)."""
    if not isinstance(sub, str) or not sub:
        raise SigningError("sub must be a non-empty string")
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0 or ttl > settings.max_token_ttl:
        raise SigningError(f"ttl must be between 1s and SECURE_WS_JWT_MAX_TTL ({settings.max_token_ttl}s)")
    clash = sorted(RESERVED_CLAIMS.intersection(extra or ()))
    if clash:
        raise SigningError(f"claims may not set {', '.join(clash)}: the issuer sets them")
    key = SigningKeys(settings).active()
    iat = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        **(extra or {}),
        "iss": settings.issuer,
        "aud": settings.audience,
        "sub": sub,
        "iat": iat,
        "exp": iat + ttl,
        "jti": secrets.token_urlsafe(16),
    }
    if scope:
        claims["scope"] = scope
    private = jwt.PyJWK({m: v for m, v in key.items() if m not in ("created", "status")}, algorithm=key["alg"])
    token = jwt.encode(claims, private.key, algorithm=key["alg"], headers={"kid": key["kid"]})
    return token, {"kid": key["kid"], "alg": key["alg"], **claims}
