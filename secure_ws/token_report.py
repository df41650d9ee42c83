"""``secure-ws token inspect``: what a token says, and what this deployment would answer it.

The header and claims are decoded without verification, for display only. The verdict comes from
the server's own pieces, built from the same settings: the keyring (``SECURE_WS_JWKS_FILE``, the
IdP's ``SECURE_WS_JWKS_URL``, the HS secret), the verifier (so never a key named or carried by the
token: ``jku``, ``x5u``, ``jwk``, ``x5c`` are refused as at a handshake), and the revocation list
(the revocation file, and Redis with ``redis://`` storage).
"""

from __future__ import annotations

from typing import Any

import jwt

from .auth.tokens import AuthError
from .service import Service
from .settings import Settings
from .wire.closes import REVOKED, SERVICE_UNAVAILABLE


def _unverified(token: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        header = None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        claims = None
    return header, claims


async def inspect_token(settings: Settings, token: str) -> dict[str, Any]:
    """``{"header", "claims", "accepted", "reason", "detail"}``; ``reason`` is the close reason a
    client would get (``token expired``, ``invalid token``, ``token revoked``…), ``detail`` why."""
    header, claims = _unverified(token)
    report: dict[str, Any] = {"header": header, "claims": claims, "accepted": False, "reason": None, "detail": None}
    service = Service(settings)  # a configuration mistake is a ConfigError, as for the server
    try:
        if settings.storage_url != "memory://":
            await service.storage.reload_revocations()  # Redis's list; the file was read when it was built
        principal = await service.verifier.verify(token)
        problem = service.storage.revocations_problem
        if problem is not None:
            report.update(reason=SERVICE_UNAVAILABLE, detail=f"revocations cannot be checked: {problem}")
        elif service.storage.revocations.covers(principal):
            report.update(reason=REVOKED, detail=f"its jti {principal.jti!r} or every token of sub {principal.sub!r} issued by then is revoked")
        else:
            report.update(accepted=True, detail=f"valid for sub {principal.sub!r}, signed by kid {principal.kid!r}")
    except AuthError as exc:
        report.update(reason=exc.reason, detail=exc.detail)
    finally:
        await service.storage.close()
    return report
