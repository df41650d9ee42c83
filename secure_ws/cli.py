"""``secure-ws`` (also ``python -m secure_ws``): the operators' commands.

Each command reads the same ``SECURE_WS_*`` variables (and ``.env``) as the
server. Errors print one line and exit non-zero; nothing here prints a
traceback for a mistake an operator can make. Every ops command says on stderr
which storage and files it used (an operator who runs it without the server's
environment sees it at once) and prints JSON on stdout with ``--json``.
"""

from __future__ import annotations

import signal

# Before anything else (the imports below take a few hundred milliseconds): SIGHUP's default action
# ends the process, and `systemctl reload` right after a start sends one. Held (blocked) from here, a
# HUP waits, pending, until the server has its reload handler (Service.lifespan, Supervisor) and
# unblocks it; an ops command ends with it still pending, unharmed.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
# ruff: noqa: E402  (the imports below come after that, on purpose)

import argparse
import asyncio
import importlib
import json
import math
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __version__
from .settings import ConfigError, Settings, check_internal_port, check_workers, load_settings, loopback_host, unreported_warnings

DEFAULT_PORT = 8443


class CommandError(Exception):
    pass


def _settings() -> Settings:
    settings = load_settings()
    for warning in unreported_warnings(settings):
        print(f"secure-ws: warning: {warning}", file=sys.stderr)
    return settings


def _used(what: str) -> None:
    """Which storage and files a command used, on stderr (stdout stays the command's output)."""
    print(f"secure-ws: {what}", file=sys.stderr)


def _where(path: Path) -> str:
    return os.path.abspath(path)


def _keys_used(settings: Settings) -> None:
    _used(f"keys {_where(settings.signing_keys_file)} (public {_where(settings.jwks_file)})")


def _storage_used(settings: Settings, wrote: bool = False) -> None:
    from .state.storage import redacted_url

    revocations = _where(settings.revocation_file)
    if settings.storage_url == "memory://":
        verb = "wrote" if wrote else "read"
        _used(f"storage memory://: {verb} {revocations}, the file servers poll (within 2 s) for revocations")
    else:
        _used(f"storage {redacted_url(settings.storage_url)} (revocations also in {revocations})")


def _print(args: argparse.Namespace, document: Any, text: str) -> None:
    print(json.dumps(document) if args.json else text)


def _time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def cmd_certs(args: argparse.Namespace) -> None:
    from .tls import make_dev_certs

    hosts = tuple(h.strip() for h in args.hosts.split(",") if h.strip())
    paths = make_dev_certs(Path(args.out), hosts)
    _used(f"wrote {_where(Path(args.out))}/")
    _print(
        args,
        {"ca": str(paths["ca"]), "cert": str(paths["cert"]), "key": str(paths["key"]), "hosts": list(hosts)},
        f"CA certificate:     {paths['ca']}  (give this to clients that must trust the dev server)\n"
        f"server certificate: {paths['cert']}  for {', '.join(hosts)}\n"
        f"server key:         {paths['key']}  (mode 0600)",
    )


def cmd_keys_rotate(args: argparse.Namespace) -> None:
    from .auth.signing import SigningKeys

    settings = _settings()
    _keys_used(settings)
    kid = SigningKeys(settings).rotate(args.alg)
    _print(args, {"kid": kid, "alg": args.alg}, kid)


def cmd_keys_list(args: argparse.Namespace) -> None:
    from .auth.signing import SigningKeys

    settings = _settings()
    _keys_used(settings)
    keys = SigningKeys(settings).list()
    if args.json:
        print(json.dumps([{"kid": k.kid, "alg": k.alg, "created": k.created, "status": k.status} for k in keys]))
        return
    if not keys:
        print("no keys (run `secure-ws keys rotate`)")
        return
    print(f"{'kid':<44} {'alg':<6} {'created (UTC)':<20} status")
    for k in keys:
        created = datetime.fromtimestamp(k.created, UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{k.kid:<44} {k.alg:<6} {created:<20} {k.status}")


def cmd_keys_retire(args: argparse.Namespace) -> None:
    from .auth.signing import SigningKeys

    settings = _settings()
    _keys_used(settings)
    SigningKeys(settings).retire(args.kid, force=args.force)
    _print(args, {"kid": args.kid, "status": "retired"}, f"retired {args.kid}: its tokens stop working within 2 s, live connections included")


def cmd_token_issue(args: argparse.Namespace) -> None:
    import jwt

    from .auth.signing import issue_token

    settings = _settings()
    _used(f"signing key from {_where(settings.signing_keys_file)}")
    token = issue_token(args.sub, scope=args.scope, ttl=args.ttl, settings=settings)  # SigningError: one line (main)
    header = jwt.get_unverified_header(token)  # our own token, just signed: read back for --json
    _print(args, {"token": token, "kid": header["kid"], "alg": header["alg"], **jwt.decode(token, options={"verify_signature": False})}, token)


def cmd_token_revoke(args: argparse.Namespace) -> None:
    from .state import actions
    from .state.storage import Storage
    from .state.url import run_storage

    settings = _settings()

    async def revoke(storage: Storage) -> dict[str, Any]:
        return await actions.revoke(storage, settings, jti=args.jti, sub=args.sub)

    revoked = asyncio.run(run_storage(settings.storage_url, settings.revocation_file, revoke))
    _storage_used(settings, wrote=True)
    text = f"revoked jti {args.jti}" if args.jti else f"revoked every token of sub {args.sub} issued until now"
    _print(args, revoked, text)


def cmd_apikey_create(args: argparse.Namespace) -> None:
    from .auth.api_keys import ApiKeyFile

    path = _settings().api_keys_file
    _used(f"api keys {_where(path)}")
    key = ApiKeyFile(path).create(args.name)
    print(f"api key {args.name!r} created (only its SHA-256 is kept): this is the only time it is shown", file=sys.stderr)
    _print(args, {"name": args.name, "key": key}, key)


def cmd_apikey_list(args: argparse.Namespace) -> None:
    from .auth.api_keys import ApiKeyFile

    path = _settings().api_keys_file
    _used(f"api keys {_where(path)}")
    keys = ApiKeyFile(path).list()
    if args.json:
        print(json.dumps([{"name": k.name, "created": k.created} for k in keys]))
        return
    if not keys:
        print("no api keys (run `secure-ws apikey create NAME`); /api/* answers 404")
        return
    print(f"{'name':<64} created (UTC)")
    for k in keys:
        print(f"{k.name:<64} {datetime.fromtimestamp(k.created, UTC).strftime('%Y-%m-%d %H:%M:%S')}")


def cmd_apikey_revoke(args: argparse.Namespace) -> None:
    from .auth.api_keys import ApiKeyFile

    path = _settings().api_keys_file
    _used(f"api keys {_where(path)}")
    ApiKeyFile(path).revoke(args.name)
    _print(args, {"name": args.name, "revoked": True}, f"revoked api key {args.name!r}: running servers refuse it within 2 s")


def cmd_publish(args: argparse.Namespace) -> None:
    from .publisher import Publisher
    from .state.storage import StorageUnavailable
    from .wire.messages import parse

    settings = _settings()
    _storage_used(settings)
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

    answer = asyncio.run(publish())
    _print(args, answer, json.dumps(answer))


def cmd_token_inspect(args: argparse.Namespace) -> int:
    """Header and claims as sent (never trusted for the verdict), then the server's own verdict: the
    same keys, verifier and revocation list a handshake meets. Exit 0 if accepted, 1 if not."""
    from .token_report import inspect_token

    settings = _settings()
    _used(f"verification keys {_where(settings.jwks_file)}" + (f" and {settings.jwks_url}" if settings.jwks_url else ""))
    _storage_used(settings)
    report = asyncio.run(inspect_token(settings, args.jwt))
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps({"header": report["header"], "claims": report["claims"]}, indent=2))
        for name in ("iat", "nbf", "exp"):
            value = report["claims"].get(name) if isinstance(report["claims"], dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and abs(value) < 1e11:
                print(f"{name}: {_time(value)}")
        verdict = "accepted" if report["accepted"] else f"refused: {report['reason']} ({report['detail']})"
        print(f"this deployment: {verdict}")
    return 0 if report["accepted"] else 1


BUILT_IN_APP = "secure_ws.main:app"
_TARGET = re.compile(r"[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*")


def _application(target: str | None) -> str:
    """``MODULE:ATTR`` (a ``SecureWS`` or its ``.app``, from the working directory) as the import string each
    worker hands uvicorn. Imported here first, once: a typo or a failing import stops start-up with one line
    (exit 2) instead of a worker that fails over and over, and the application's own settings are checked."""
    if target is None:
        return BUILT_IN_APP
    from .app import SecureWS
    from .service import Service

    if not _TARGET.fullmatch(target):
        raise CommandError(f"application {target[:200]!r}: use MODULE:ATTR, e.g. myapp:api")
    module_name, attr = target.split(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `uvicorn` does; workers inherit sys.path
    try:
        found: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            found = getattr(found, part)
    except ImportError as exc:
        raise CommandError(f"application {target!r}: cannot import {module_name}: {exc}") from None
    except AttributeError:
        raise CommandError(f"application {target!r}: {module_name} has no attribute {attr}") from None
    if isinstance(found, SecureWS):
        return f"{target}.app"
    if isinstance(getattr(found, "service", None), Service):
        return target
    raise CommandError(f"application {target!r} is a {type(found).__name__}, not a SecureWS or its .app")


def _serve(settings: Settings, host: str, port: int, workers: int, tls: bool = True, target: str | None = None, **extra: Any) -> int:
    from .service import Service
    from .tls import server_context
    from .uvicorn.serve import serve

    if tls:
        for variable, path in (("SECURE_WS_TLS_CERTFILE", settings.tls_certfile), ("SECURE_WS_TLS_KEYFILE", settings.tls_keyfile)):
            if not path.is_file():
                raise ConfigError(variable, f"{_where(path)} not found (run `secure-ws certs`)")
        # Build the context once here, so a bad file stops start-up with one line naming its variable.
        server_context(settings.tls_certfile, settings.tls_keyfile, settings.tls_min_version, settings.tls_client_ca)
    check_workers(settings, workers)
    check_internal_port(settings, port)  # from the flag or the environment alike
    # What each worker builds (keys, revocation file): a mistake stops here, once, before any worker starts.
    app = _application(target)
    if app == BUILT_IN_APP:
        Service(settings)
    return serve(settings, host, port, workers, tls=tls, app=app, **extra)


def cmd_serve(args: argparse.Namespace) -> int:
    # Both are read by every worker from the environment, so the flags set the variables.
    if args.forwarded_allow_ips is not None:
        os.environ["SECURE_WS_FORWARDED_ALLOW_IPS"] = args.forwarded_allow_ips
    if args.internal_port is not None:
        os.environ["SECURE_WS_INTERNAL_PORT"] = str(args.internal_port)
    settings = _settings()
    if args.no_tls and not (loopback_host(args.host) or settings.forwarded_allow_ips):
        raise CommandError(
            f"--no-tls on {args.host} would carry tokens in clear: bind a loopback --host, or name the balancer "
            "that ends TLS in --forwarded-allow-ips"
        )
    return _serve(
        settings, args.host, args.port, args.workers, tls=not args.no_tls, internal_port=settings.internal_port,
        log_level=args.log_level, access_log=args.access_log, target=args.app,
    )


def cmd_dev(args: argparse.Namespace) -> int:
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
    token = issue_token("dev-user", scope="subscribe:* publish:*", ttl=3600, settings=settings)
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

Try it from another terminal (prints the welcome, then the answer to a ping; the token goes in a header):
  TOKEN={token} {_try_it(ca, args.port)}
""",
        flush=True,
    )
    return _serve(settings, args.host, args.port, 1, target=args.app)


def _try_it(ca: Path, port: int) -> str:
    """A one-line client for the dev banner: the token from $TOKEN in an Authorization header, never in the
    URL; run by this same Python (so it works from a terminal without the virtualenv active), as bash's or
    zsh's ``$'…'`` string so that the connection can be a ``with`` block on one pasted line."""
    import shlex

    code = (
        "import json, os, ssl\n"
        "from websockets.sync.client import connect\n"
        f"with connect('wss://localhost:{port}/ws', ssl=ssl.create_default_context(cafile={str(ca)!r}), "
        "additional_headers={'Authorization': 'Bearer ' + os.environ['TOKEN']}) as ws:\n"
        "    print(ws.recv()); ws.send(json.dumps({'type': 'ping'})); print(ws.recv())"
    )
    quoted = "$'" + code.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
    return f"{shlex.quote(sys.executable)} -c {quoted}"


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (or says it is required)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or action.nargs == 0 or "%(default)" in text or "(default" in text:
            return text
        if action.required:
            return f"{text} (required)"
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})"


def _command(subparsers: Any, name: str, helptext: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=helptext, description=helptext, formatter_class=_HelpFormatter)
    return parser


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secure-ws", description="secure_ws operations (reads SECURE_WS_* variables and .env, like the server)",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"secure-ws {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "certs", "dev CA + server certificate and key")
    p.add_argument("--out", default="certs", help="folder to write ca.crt, server.crt and server.key to")
    p.add_argument("--hosts", default="localhost,127.0.0.1,::1", help="comma-separated names and addresses the certificate is for")
    _json_option(p)
    p.set_defaults(func=cmd_certs)

    keys = _command(sub, "keys", "signing keys").add_subparsers(dest="keys_command", required=True)
    p = _command(keys, "rotate", "new active signing key; previous keys keep verifying")
    p.add_argument("--alg", default="EdDSA", choices=("EdDSA", "ES256", "RS256"), help="algorithm of the new key")
    _json_option(p)
    p.set_defaults(func=cmd_keys_rotate)
    p = _command(keys, "list", "kid, algorithm, created, status")
    _json_option(p)
    p.set_defaults(func=cmd_keys_list)
    p = _command(keys, "retire", "remove a key: its tokens stop working, live connections included")
    p.add_argument("kid", help="the key's kid (see `keys list`)")
    p.add_argument("--force", action="store_true", help="retire even the active key (then no token can be signed)")
    _json_option(p)
    p.set_defaults(func=cmd_keys_retire)

    token = _command(sub, "token", "tokens").add_subparsers(dest="token_command", required=True)
    p = _command(token, "issue", "print a JWT signed with the active key")
    p.add_argument("--sub", required=True, help="the token's subject (user or device id)")
    p.add_argument("--ttl", default="15m", help="lifetime: 90s, 15m, 2h, 1d (at most SECURE_WS_JWT_MAX_TTL)")
    p.add_argument("--scope", default=None, help='space-separated rights, e.g. "subscribe:room.* publish:room.lobby"')
    _json_option(p)
    p.set_defaults(func=cmd_token_issue)
    p = _command(token, "revoke", "revoke one token (--jti) or every token of a sub issued until now")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--jti", help="the token's jti (see `token inspect`)")
    group.add_argument("--sub", help="the subject whose tokens issued until now are revoked")
    _json_option(p)
    p.set_defaults(func=cmd_token_revoke)
    p = _command(token, "inspect", "show a token's header and claims, and whether this deployment accepts it (exit 0) or not (exit 1)")
    p.add_argument("jwt", help="the token")
    _json_option(p)
    p.set_defaults(func=cmd_token_inspect)

    apikey = _command(sub, "apikey", "server-API keys").add_subparsers(dest="apikey_command", required=True)
    p = _command(apikey, "create", "print a new API key, once; only its SHA-256 is stored")
    p.add_argument("name", help="the key's name, one per backend (letters, digits, _.:- ; at most 64)")
    _json_option(p)
    p.set_defaults(func=cmd_apikey_create)
    p = _command(apikey, "list", "names and creation times (never keys or hashes)")
    _json_option(p)
    p.set_defaults(func=cmd_apikey_list)
    p = _command(apikey, "revoke", "delete a key: running servers refuse it within 2 s")
    p.add_argument("name", help="the key's name (see `apikey list`)")
    _json_option(p)
    p.set_defaults(func=cmd_apikey_revoke)

    p = _command(sub, "publish", "publish JSON to a channel through the shared Redis (as POST /api/publish)")
    p.add_argument("channel", help="the channel, ^[A-Za-z0-9_.:-]{1,128}$")
    p.add_argument("json", help="the message's data, as JSON")
    _json_option(p)
    p.set_defaults(func=cmd_publish)

    for name, helptext in (("serve", "run the server with the hardened TLS context"), ("dev", "the quickstart")):
        p = _command(sub, name, helptext)
        p.add_argument(
            "app", nargs="?", default=None, metavar="MODULE:ATTR",
            help="an application to serve instead of the built-in one: a SecureWS (or its .app), imported from the working directory",
        )
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every IPv4 interface)")
        p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port for wss:// (or ws:// with --no-tls)")
        if name == "serve":
            p.add_argument("--workers", type=int, default=1, help="worker processes; more than 1 needs SECURE_WS_STORAGE_URL=redis://…")
            p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"), help="least severe level logged")
            p.add_argument("--no-access-log", dest="access_log", action="store_false", help="no line per request")
            p.add_argument(
                "--forwarded-allow-ips", default=None,
                help="proxies (IPs, CIDRs, or *) whose X-Forwarded-For names the client, for the handshake throttle "
                "and the access log; sets SECURE_WS_FORWARDED_ALLOW_IPS (default: that variable, else none)",
            )
            p.add_argument(
                "--no-tls", action="store_true",
                help="plain HTTP/ws:// for a balancer that ends TLS; only on a loopback --host or with --forwarded-allow-ips",
            )
            p.add_argument(
                "--internal-port", type=int, default=None,
                help="serve /metrics and /api/* only on 127.0.0.1:PORT (same TLS as --port; 404 on the public port); "
                "sets SECURE_WS_INTERNAL_PORT",
            )
        p.set_defaults(func=cmd_serve if name == "serve" else cmd_dev)
    return parser


_VALUE_OPTIONS = ("--jti", "--sub")
# Commands whose positional argument (a kid: base64url; a JWT) may start with '-': every other word is
# moved behind "--", so argparse never reads it as an option.
_POSITIONAL_AFTER = {("keys", "retire"): ("--force", "--json", "-h", "--help"), ("token", "inspect"): ("--json", "-h", "--help")}


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
    flags = _POSITIONAL_AFTER.get((out[0], out[1])) if len(out) >= 2 else None
    if flags is not None and "--" not in out[2:]:
        rest = out[2:]
        out = [*out[:2], *(a for a in rest if a in flags), "--", *(a for a in rest if a not in flags)]
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_protect_dashes(sys.argv[1:] if argv is None else argv))
    from .auth.api_keys import ApiKeyError
    from .auth.signing import SigningError
    from .state.storage import StorageUnavailable

    try:
        code = args.func(args)
    except ConfigError as exc:
        print(f"secure-ws: configuration error: {exc}", file=sys.stderr)  # the app's own words under uvicorn
        return 2
    except (CommandError, SigningError, ApiKeyError) as exc:
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
    return code or 0
