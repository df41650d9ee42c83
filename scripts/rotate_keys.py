#!/usr/bin/env python3
"""Cron-ready signing-key rotation.

    python scripts/rotate_keys.py [--alg EdDSA|ES256|RS256] [--keep SECONDS]

1. ``keys rotate``: a new key becomes active; the previous one keeps verifying
   the tokens it signed.
2. Retires every previous key that was superseded longer ago than the longest
   token lifetime (``SECURE_WS_JWT_MAX_TTL`` + ``SECURE_WS_JWT_LEEWAY_SECONDS``,
   or ``--keep``): no valid token can carry its signature any more.

Running servers pick both changes up within 2 s. Reads the same ``SECURE_WS_*``
variables (and ``.env``) as the server; run it from the service's working
directory, e.g. daily::

    17 3 * * *  cd /srv/secure-ws && .venv/bin/python scripts/rotate_keys.py >> rotate.log 2>&1

Paths are the configured ones, relative to the working directory, as for the
``secure-ws`` command; the files used are named on stderr. It never makes the
first key: without a signing-key file (run from the wrong directory?) it refuses.

Exit status: 0 on success, 2 on a configuration or key-file error (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from secure_ws.auth.signing import SigningError, SigningKeys  # noqa: E402
from secure_ws.settings import ConfigError, load_settings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rotate the signing key and retire keys no token can use.")
    parser.add_argument("--alg", default="EdDSA", choices=("EdDSA", "ES256", "RS256"))
    parser.add_argument("--keep", type=int, default=None, help="seconds a superseded key keeps verifying")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        private = settings.signing_keys_file
        if not private.is_file():
            # A fresh certs/ here would hold keys no server reads, and the real ones would never rotate.
            raise SigningError(
                f"no signing keys at {private.resolve()}: run it from the service's working directory "
                "(or set SECURE_WS_SIGNING_KEYS_FILE); `secure-ws keys rotate` makes the first key"
            )
        print(f"rotate_keys: keys {private.resolve()} (public {settings.jwks_file.resolve()})", file=sys.stderr)
        keys = SigningKeys(settings)
        kid = keys.rotate(args.alg)
        keep = args.keep if args.keep is not None else settings.max_token_ttl + settings.leeway
        retired = keys.retire_unused(keep)
    except (ConfigError, SigningError, OSError, ValueError) as exc:
        print(f"rotate_keys: {exc}", file=sys.stderr)
        return 2
    print(f"active: {kid}")
    for old in retired:
        print(f"retired: {old}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
