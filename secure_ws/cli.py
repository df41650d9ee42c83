"""``secure-ws`` (also ``python -m secure_ws``): the operators' commands.

Each command reads the same ``SECURE_WS_*`` variables (and ``.env``) as the
server. Errors print one line and exit non-zero; nothing here prints a
traceback for a mistake an operator can make.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .settings import ConfigError, Settings, load_settings, parse_duration

DEFAULT_PORT = 8443


class CommandError(Exception):
    pass


def _settings() -> Settings:
    return load_settings()


def cmd_certs(args: argparse.Namespace) -> None:
    from .tls import make_dev_certs

    hosts = tuple(h.strip() for h in args.hosts.split(",") if h.strip())
    paths = make_dev_certs(Path(args.out), hosts)
    print(f"CA certificate:     {paths['ca']}  (give this to clients that must trust the dev server)")
    print(f"server certificate: {paths['cert']}  for {', '.join(hosts)}")
    print(f"server key:         {paths['key']}  (mode 0600)")


def cmd_keys_rotate(args: argparse.Namespace) -> None:
    from .auth.signing import SigningKeys

    print(SigningKeys(_settings()).rotate(args.alg))


def cmd_keys_list(args: argparse.Namespace) -> None:
    from .auth.signing import SigningKeys

    keys = SigningKeys(_settings()).list()
    if not keys:
        print("no keys (run `secure-ws keys rotate`)")
        return
    print(f"{'kid':<44} {'alg':<6} {'created (UTC)':<20} status")
    for k in keys:
        created = datetime.fromtimestamp(k.created, UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{k.kid:<44} {k.alg:<6} {created:<20} {k.status}")


def cmd_keys_retire(args: argparse.Namespace) -> None:
    from .auth.signing import SigningKeys

    SigningKeys(_settings()).retire(args.kid)
    print(f"retired {args.kid}: its tokens stop working within 2 s, live connections included")


def cmd_token_issue(args: argparse.Namespace) -> None:
    from .auth.signing import issue_token

    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise CommandError(f"--ttl: {exc}") from None
    print(issue_token(_settings(), args.sub, ttl, args.scope))


def cmd_token_revoke(args: argparse.Namespace) -> None:
    from .state import actions
    from .state.storage import Storage
    from .state.url import run_storage

    settings = _settings()

    async def revoke(storage: Storage) -> None:
        await actions.revoke(storage, settings, jti=args.jti, sub=args.sub)

    asyncio.run(run_storage(settings.storage_url, settings.revocation_file, revoke))
    if args.jti:
        print(f"revoked jti {args.jti}")
    else:
        print(f"revoked every token of sub {args.sub} issued until now")


def cmd_apikey_create(args: argparse.Namespace) -> None:
    from .auth.api_keys import ApiKeyFile

    path = _settings().api_keys_file
    key = ApiKeyFile(path).create(args.name)
    print(f"api key {args.name!r} created in {path} (only its SHA-256 is kept): this is the only time it is shown", file=sys.stderr)
    print(key)


def cmd_apikey_list(args: argparse.Namespace) -> None:
    from .auth.api_keys import ApiKeyFile

    path = _settings().api_keys_file
    print(f"api keys file: {path}", file=sys.stderr)
    keys = ApiKeyFile(path).list()
    if not keys:
        print("no api keys (run `secure-ws apikey create NAME`); /api/* answers 404")
        return
    print(f"{'name':<64} created (UTC)")
    for k in keys:
        print(f"{k.name:<64} {datetime.fromtimestamp(k.created, UTC).strftime('%Y-%m-%d %H:%M:%S')}")


def cmd_apikey_revoke(args: argparse.Namespace) -> None:
    from .auth.api_keys import ApiKeyFile

    path = _settings().api_keys_file
    ApiKeyFile(path).revoke(args.name)
    print(f"revoked api key {args.name!r} in {path}: running servers refuse it within 2 s")


def cmd_publish(args: argparse.Namespace) -> None:
    from .publisher import Publisher
    from .state.storage import StorageUnavailable
    from .wire.messages import parse

    settings = _settings()
    if settings.storage_url == "memory://":
        raise CommandError(
            "publish needs SECURE_WS_STORAGE_URL=redis://… shared with the server: with memory:// the server's "
            "state lives inside its own process (use POST /api/publish instead)"
        )
    try:
        data = parse(args.json)
    except ValueError:
        raise CommandError("JSON: not valid JSON (quote it for the shell: '{\"text\":\"hi\"}')") from None

    async def publish() -> dict[str, Any]:
        async with Publisher.from_url(settings.storage_url, settings) as publisher:
            try:
                return await publisher.publish(args.channel, data)
            except StorageUnavailable as exc:
                raise CommandError(f"SECURE_WS_STORAGE_URL does not answer: {exc}") from None

    print(json.dumps(asyncio.run(publish())))


def _serve(settings: Settings, host: str, port: int, workers: int, **extra: Any) -> None:
    from .tls import server_context
    from .uvicorn.serve import serve

    for variable, path in (("SECURE_WS_TLS_CERTFILE", settings.tls_certfile), ("SECURE_WS_TLS_KEYFILE", settings.tls_keyfile)):
        if not path.is_file():
            raise ConfigError(variable, f"{path} not found (run `secure-ws certs`)")
    # Build the context once here, so a bad file stops start-up with one line naming its variable.
    server_context(settings.tls_certfile, settings.tls_keyfile, settings.tls_min_version, settings.tls_client_ca)
    serve(settings, host, port, workers, **extra)


def cmd_serve(args: argparse.Namespace) -> None:
    _serve(_settings(), args.host, args.port, args.workers, log_level=args.log_level, access_log=args.access_log)


def cmd_dev(args: argparse.Namespace) -> None:
    from .auth.signing import SigningKeys, issue_token
    from .tls import make_dev_certs

    os.environ.setdefault("SECURE_WS_DEMO", "1")
    # The demo page is a browser client: its own origin must pass the (exact-match) allow-list.
    os.environ.setdefault("SECURE_WS_ALLOWED_ORIGINS", f"https://localhost:{args.port},https://127.0.0.1:{args.port}")
    settings = _settings()
    if not settings.tls_certfile.exists() or not settings.tls_keyfile.exists():
        make_dev_certs(settings.tls_certfile.parent)
        print(f"created dev CA and certificate in {settings.tls_certfile.parent}/")
    keys = SigningKeys(settings)
    if not any(k.status == "active" for k in keys.list()) or not settings.jwks_file.exists():
        print(f"created signing key {keys.rotate('EdDSA')}")
    token = issue_token(settings, "dev-user", 3600, "subscribe:* publish:*")
    ca = settings.tls_certfile.parent / "ca.crt"
    print(
        f"""
secure-ws dev server on https://localhost:{args.port}
  WebSocket:   wss://localhost:{args.port}/ws
  health:      https://localhost:{args.port}/healthz
  demo page:   https://localhost:{args.port}/demo#token={token}
               (trust {ca} in your browser first, or accept the warning once)
  CA to trust: {ca}

A token for sub "dev-user", valid 1 h, may subscribe and publish on any channel:

{token}

Try it from another terminal (type {{"type":"ping"}} and press enter):
  SSL_CERT_FILE={ca} python -m websockets "wss://localhost:{args.port}/ws?access_token={token}"
""",
        flush=True,
    )
    _serve(settings, args.host, args.port, 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secure-ws", description="secure_ws operations")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("certs", help="dev CA + server certificate and key")
    p.add_argument("--out", default="certs")
    p.add_argument("--hosts", default="localhost,127.0.0.1,::1")
    p.set_defaults(func=cmd_certs)

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("rotate", help="new active signing key; previous keys keep verifying")
    p.add_argument("--alg", default="EdDSA", choices=("EdDSA", "ES256", "RS256"))
    p.set_defaults(func=cmd_keys_rotate)
    p = keys.add_parser("list", help="kid, algorithm, created, status")
    p.set_defaults(func=cmd_keys_list)
    p = keys.add_parser("retire", help="remove a key: its tokens stop working, live connections included")
    p.add_argument("kid")
    p.set_defaults(func=cmd_keys_retire)

    token = sub.add_parser("token", help="tokens").add_subparsers(dest="token_command", required=True)
    p = token.add_parser("issue", help="print a JWT signed with the active key")
    p.add_argument("--sub", required=True)
    p.add_argument("--ttl", default="15m")
    p.add_argument("--scope", default=None)
    p.set_defaults(func=cmd_token_issue)
    p = token.add_parser("revoke", help="revoke one token (--jti) or every token of a sub issued until now")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--jti")
    group.add_argument("--sub")
    p.set_defaults(func=cmd_token_revoke)

    apikey = sub.add_parser("apikey", help="server-API keys").add_subparsers(dest="apikey_command", required=True)
    p = apikey.add_parser("create", help="print a new API key, once; only its hash is stored")
    p.add_argument("name")
    p.set_defaults(func=cmd_apikey_create)
    p = apikey.add_parser("list", help="names and creation times (never keys or hashes)")
    p.set_defaults(func=cmd_apikey_list)
    p = apikey.add_parser("revoke", help="delete a key: running servers refuse it within 2 s")
    p.add_argument("name")
    p.set_defaults(func=cmd_apikey_revoke)

    p = sub.add_parser("publish", help="publish JSON to a channel through the shared Redis (as POST /api/publish)")
    p.add_argument("channel")
    p.add_argument("json", help="the message's data, as JSON")
    p.set_defaults(func=cmd_publish)

    for name, helptext in (("serve", "run the server with the hardened TLS context"), ("dev", "the quickstart")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=DEFAULT_PORT)
        if name == "serve":
            p.add_argument("--workers", type=int, default=1)
            p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
            p.add_argument("--no-access-log", dest="access_log", action="store_false", help="no line per request")
        p.set_defaults(func=cmd_serve if name == "serve" else cmd_dev)
    return parser


_VALUE_OPTIONS = ("--jti", "--sub")


def _protect_dashes(argv: list[str]) -> list[str]:
    """Kids and jtis are base64url and may start with '-', which argparse would read as an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in _VALUE_OPTIONS and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    if out[:2] == ["keys", "retire"] and len(out) == 3 and out[2] != "--":
        out.insert(2, "--")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_protect_dashes(sys.argv[1:] if argv is None else argv))
    from .auth.api_keys import ApiKeyError
    from .auth.signing import SigningError
    from .state.storage import StorageUnavailable

    try:
        args.func(args)
    except (ConfigError, CommandError, SigningError, ApiKeyError) as exc:
        print(f"secure-ws: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"secure-ws: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    except StorageUnavailable as exc:
        print(f"secure-ws: storage unavailable: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
