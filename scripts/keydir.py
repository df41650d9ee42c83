"""A key directory for a throw-away deployment: dev CA, server certificate, one EdDSA signing key.

Shared by the test suite (its session-wide ``keydir``) and ``scripts/bench.py``, so both run the
service on key material made the way ``secure-ws certs`` and ``secure-ws keys rotate`` make it.
"""

from __future__ import annotations

import os
from pathlib import Path


def keydir_env(folder: Path, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (the process environment by default) without any ``SECURE_WS_*``, pointed at ``folder``."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("SECURE_WS_")}
    env.update(
        SECURE_WS_JWKS_FILE=str(folder / "jwks.json"),
        SECURE_WS_SIGNING_KEYS_FILE=str(folder / "signing-keys.json"),
        SECURE_WS_REVOCATION_FILE=str(folder / "revocations.json"),
        SECURE_WS_TLS_CERTFILE=str(folder / "server.crt"),
        SECURE_WS_TLS_KEYFILE=str(folder / "server.key"),
    )
    env.update(extra)
    return env


def make_keydir(folder: Path, alg: str = "EdDSA") -> Path:
    """Create the dev certificates and an active signing key in ``folder``; returns ``folder``."""
    from secure_ws.auth.signing import SigningKeys
    from secure_ws.settings import load_settings
    from secure_ws.tls import make_dev_certs

    folder.mkdir(parents=True, exist_ok=True)
    make_dev_certs(folder)
    settings = load_settings(keydir_env(folder), env_file=None)
    SigningKeys(settings).rotate(alg)
    return folder
