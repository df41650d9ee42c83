"""Configuration from the environment and ``.env``, validated once at start-up.

Every value is checked here so that a mistake stops the process with one line
naming the variable (:class:`ConfigError`), instead of surfacing later as a
traceback or, worse, as a silently weaker default.

``.env`` follows the usual dotenv syntax (python-dotenv's parser: ``export``,
quotes, trailing ``# comments``; no ``${VAR}`` expansion); a line it cannot parse
stops start-up naming the line. Every variable is read through ``get``/``config``
inside :func:`load_settings`, which records the names read: a ``SECURE_WS_*``
variable set but never read is a misspelling, reported in ``Settings.warnings``
with the nearest real name.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from dotenv.parser import parse_stream
from limits import RateLimitItem, parse_many

ASYMMETRIC_ALGORITHMS = frozenset(
    {"EdDSA", "ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
STRATEGIES = ("sliding-window", "moving-window", "fixed-window")
MIN_SECRET_BYTES = 32
MAX_HISTORY_SIZE = 10_000
PROXY_EVENTS = ("subscribe", "publish", "connect")

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_TIMEOUT = re.compile(r"^\s*(\d{1,6}(?:\.\d{1,3})?)\s*(ms|s|m)?\s*$")
_TIMEOUT_UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0}


class ConfigError(Exception):
    """A configuration value is unusable; the message names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` → seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 2h, 1d)")
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_timeout(text: str) -> float:
    """``10s``, ``500ms``, ``2.5``, ``1m`` → seconds, more than zero."""
    match = _TIMEOUT.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"not a timeout: {text!r} (use e.g. 10s, 500ms, 1m)")
    return float(match.group(1)) * _TIMEOUT_UNITS[match.group(2)]


def loopback_host(host: str | None) -> bool:
    """``localhost`` or a loopback address (``127.0.0.0/8``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    jwks_file: Path = Path("certs/jwks.json")
    jwks_file_required: bool = True
    signing_keys_file: Path = Path("certs/signing-keys.json")
    jwks_url: str | None = None
    algorithms: tuple[str, ...] = ("EdDSA", "ES256", "RS256")
    jwt_secret: bytes | None = field(default=None, repr=False)
    issuer: str = "secure-ws"
    audience: str = "secure-ws"
    leeway: int = 30
    max_token_ttl: int = 86400
    rate_limit: str = "20/second"
    rate_limits: tuple[RateLimitItem, ...] = ()
    rate_limit_strategy: str = "sliding-window"
    rate_limit_close_after: int = 10
    handshake_rate_limit: str = "60/minute"
    handshake_rate_limits: tuple[RateLimitItem, ...] = ()
    max_connections_per_client: int = 10
    max_message_bytes: int = 65536
    send_queue_bytes: int = 4 * 1024 * 1024
    max_subscriptions: int = 128
    history_size: int = 100
    history_ttl: int = 300
    history_max_bytes: int = 64 * 1024 * 1024
    handler_timeout: float = 10.0
    stream_timeout: float = 300.0
    max_inflight: int = 8
    rpc_proxy_url: str | None = None
    rpc_proxy_secret: bytes | None = field(default=None, repr=False)
    rpc_proxy_events: frozenset[str] = frozenset()  # of PROXY_EVENTS: sent to the RPC proxy as $subscribe, …
    channels_file: Path | None = None  # TOML [[channels]] rules (secure_ws.state.channel_options)
    allowed_origins: frozenset[str] = frozenset()
    forwarded_allow_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    storage_url: str = "memory://"
    revocation_file: Path = Path("certs/revocations.json")
    api_keys_file: Path = Path("certs/api-keys.json")
    tls_certfile: Path = Path("certs/server.crt")
    tls_keyfile: Path = Path("certs/server.key")
    tls_client_ca: Path | None = None
    tls_min_version: str = "1.2"
    log_format: str = "text"
    demo: bool = False
    internal_port: int | None = None
    # Problems worth a warning but not a refusal (a misspelt variable); see :func:`unreported_warnings`.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def history(self) -> bool:
        """Channels keep history (SPEC §11): off when either its size or its TTL is 0."""
        return self.history_size > 0 and self.history_ttl > 0


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` pairs of a dotenv file; a line that cannot be parsed is a :class:`ConfigError`
    naming the file and the line number (never the line itself: it may hold a secret)."""
    values: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as stream:
            for binding in parse_stream(stream):
                if binding.error:
                    raise ConfigError(
                        str(path), f"line {binding.original.line} cannot be parsed (use KEY=value; export, quotes and # comments work)"
                    )
                if binding.key is not None and binding.value is not None:  # a bare `KEY` line sets nothing
                    values[binding.key] = binding.value
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot be read: {exc.__class__.__name__}") from None
    return values


def check_workers(settings: Settings, workers: int) -> None:
    """More than one worker process needs shared state: ``memory://`` would split pub/sub, limits and
    connection counts between them without a word."""
    if workers > 1 and settings.storage_url == "memory://":
        raise ConfigError(
            "SECURE_WS_STORAGE_URL",
            f"memory:// holds state in one process, but {workers} workers were asked for: "
            "set redis://host:port/db, or run one worker",
        )


_reported: set[str] = set()


def unreported_warnings(settings: Settings) -> list[str]:
    """``settings.warnings`` not yet reported by this process (settings are loaded more than once
    in ``secure-ws serve``: by the command, then by the app)."""
    fresh = [w for w in settings.warnings if w not in _reported]
    _reported.update(fresh)
    return fresh


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | os.PathLike[str] | None = ".env"
) -> Settings:
    """Read and validate every ``SECURE_WS_*`` variable; the real environment wins over ``.env``."""
    file_values = read_env_file(Path(env_file)) if env_file is not None and Path(env_file).is_file() else {}
    real = os.environ if environ is None else environ
    source = {**file_values, **real}  # the real environment wins
    read: set[str] = set()

    def config(key: str, default: str = "") -> str:
        read.add(key)
        return source.get(key, default)

    def get(name: str, default: str = "") -> str:
        return config(f"SECURE_WS_{name}", default=default).strip()

    def integer(name: str, default: int, minimum: int = 0) -> int:
        raw = get(name, str(default))
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"SECURE_WS_{name}", f"not an integer: {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"SECURE_WS_{name}", f"must be at least {minimum}, got {value}")
        return value

    def limits_of(name: str, default: str) -> tuple[str, tuple[RateLimitItem, ...]]:
        raw = get(name, default)
        try:
            items = tuple(parse_many(raw))
        except ValueError:
            items = ()
        if not items:
            raise ConfigError(
                f"SECURE_WS_{name}", f"not a rate limit: {raw!r} (use e.g. 20/second or 20/second;600/minute)"
            )
        return raw, items

    def choice(name: str, default: str, choices: tuple[str, ...]) -> str:
        value = get(name, default)
        if value not in choices:
            raise ConfigError(f"SECURE_WS_{name}", f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def path(name: str, default: str) -> Path:
        return Path(get(name, default) or default)

    algorithms = tuple(a.strip() for a in get("JWT_ALGORITHMS", "EdDSA,ES256,RS256").split(",") if a.strip())
    if not algorithms:
        raise ConfigError("SECURE_WS_JWT_ALGORITHMS", "empty allow-list")
    for alg in algorithms:
        if alg.lower() == "none":
            raise ConfigError("SECURE_WS_JWT_ALGORITHMS", "'none' (unsigned tokens) is never accepted")
        if alg not in ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS:
            raise ConfigError("SECURE_WS_JWT_ALGORITHMS", f"unknown algorithm {alg!r}")

    secret_text = config("SECURE_WS_JWT_SECRET", default="")
    secret = secret_text.encode() if secret_text else None
    hmac_named = [a for a in algorithms if a in HMAC_ALGORITHMS]
    if secret is not None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(
                "SECURE_WS_JWT_SECRET", f"too weak: {len(secret)} bytes, at least {MIN_SECRET_BYTES} required"
            )
        if not hmac_named:
            raise ConfigError(
                "SECURE_WS_JWT_SECRET", "is set but SECURE_WS_JWT_ALGORITHMS names no HS algorithm (add HS256)"
            )
    elif hmac_named:
        raise ConfigError("SECURE_WS_JWT_ALGORITHMS", f"{hmac_named[0]} is allowed but SECURE_WS_JWT_SECRET is not set")

    jwks_url = get("JWKS_URL") or None
    if jwks_url is not None and not jwks_url.startswith("https://"):
        raise ConfigError("SECURE_WS_JWKS_URL", "must be an https:// URL")

    jwks_explicit = bool(get("JWKS_FILE"))
    try:
        leeway = parse_duration(get("JWT_LEEWAY_SECONDS", "30"))
    except ValueError as exc:
        raise ConfigError("SECURE_WS_JWT_LEEWAY_SECONDS", str(exc)) from None
    try:
        max_ttl = parse_duration(get("JWT_MAX_TTL", "24h"))
    except ValueError as exc:
        raise ConfigError("SECURE_WS_JWT_MAX_TTL", str(exc)) from None

    rate_limit, rate_limits = limits_of("RATE_LIMIT", "20/second")
    handshake_limit, handshake_limits = limits_of("HANDSHAKE_RATE_LIMIT", "60/minute")

    origins = frozenset(o.strip() for o in get("ALLOWED_ORIGINS").split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError(
                "SECURE_WS_ALLOWED_ORIGINS", f"not an origin: {origin!r} (use scheme://host[:port], no path)"
            )

    proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for entry in (e.strip() for e in get("FORWARDED_ALLOW_IPS").split(",")):
        if entry == "*":
            proxies += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
        elif entry:
            try:
                proxies.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ConfigError(
                    "SECURE_WS_FORWARDED_ALLOW_IPS", f"not an IP address or network: {entry[:100]!r}"
                ) from None

    storage_url = get("STORAGE_URL", "memory://")
    if not (storage_url == "memory://" or re.match(r"^rediss?://", storage_url)):
        raise ConfigError("SECURE_WS_STORAGE_URL", f"use memory:// or redis://host:port/db, got {storage_url!r}")

    try:
        handler_timeout = parse_timeout(get("HANDLER_TIMEOUT", "10s"))
    except ValueError as exc:
        raise ConfigError("SECURE_WS_HANDLER_TIMEOUT", str(exc)) from None
    try:
        stream_timeout = parse_timeout(get("STREAM_TIMEOUT", "5m"))
    except ValueError as exc:
        raise ConfigError("SECURE_WS_STREAM_TIMEOUT", str(exc)) from None

    proxy_url = get("RPC_PROXY_URL") or None
    proxy_secret_text = config("SECURE_WS_RPC_PROXY_SECRET", default="")
    proxy_secret = proxy_secret_text.encode() if proxy_secret_text else None
    if proxy_url is not None:
        parts = urlsplit(proxy_url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigError("SECURE_WS_RPC_PROXY_URL", "must be an https:// URL (or http:// to a loopback address)")
        if parts.scheme == "http" and not loopback_host(parts.hostname):
            # The secret and every client's claims would cross the network in clear.
            raise ConfigError("SECURE_WS_RPC_PROXY_URL", f"http:// only to a loopback address, got host {parts.hostname[:100]!r}; use https://")
        if parts.username or parts.password:
            raise ConfigError("SECURE_WS_RPC_PROXY_URL", "must not hold credentials; set SECURE_WS_RPC_PROXY_SECRET")
        if proxy_secret is None:
            raise ConfigError("SECURE_WS_RPC_PROXY_SECRET", "must be set when SECURE_WS_RPC_PROXY_URL is")
    if proxy_secret is not None:
        if len(proxy_secret) < MIN_SECRET_BYTES:
            raise ConfigError(
                "SECURE_WS_RPC_PROXY_SECRET", f"too weak: {len(proxy_secret)} bytes, at least {MIN_SECRET_BYTES} required"
            )
        if proxy_url is None:
            raise ConfigError("SECURE_WS_RPC_PROXY_SECRET", "is set but SECURE_WS_RPC_PROXY_URL is not")
    proxy_events = frozenset(e.strip() for e in get("RPC_PROXY_EVENTS").split(",") if e.strip())
    if proxy_events - set(PROXY_EVENTS):
        raise ConfigError("SECURE_WS_RPC_PROXY_EVENTS", f"use a comma-separated list of {', '.join(PROXY_EVENTS)}")
    if proxy_events and proxy_url is None:
        raise ConfigError("SECURE_WS_RPC_PROXY_EVENTS", "is set but SECURE_WS_RPC_PROXY_URL is not")

    try:
        history_ttl = parse_duration(get("HISTORY_TTL", "5m"))
    except ValueError as exc:
        raise ConfigError("SECURE_WS_HISTORY_TTL", str(exc)) from None
    history_size = integer("HISTORY_SIZE", 100)
    if history_size > MAX_HISTORY_SIZE:  # one recovery sends at most this many messages in one go
        raise ConfigError("SECURE_WS_HISTORY_SIZE", f"at most {MAX_HISTORY_SIZE}, got {history_size}")

    client_ca = get("TLS_CLIENT_CA")
    settings = Settings(
        jwks_file=path("JWKS_FILE", "certs/jwks.json"),
        # The default path may be absent when an IdP URL supplies the keys.
        jwks_file_required=jwks_explicit or jwks_url is None,
        signing_keys_file=path("SIGNING_KEYS_FILE", "certs/signing-keys.json"),
        jwks_url=jwks_url,
        algorithms=algorithms,
        jwt_secret=secret,
        issuer=get("JWT_ISSUER", "secure-ws"),
        audience=get("JWT_AUDIENCE", "secure-ws"),
        leeway=leeway,
        max_token_ttl=max_ttl,
        rate_limit=rate_limit,
        rate_limits=rate_limits,
        rate_limit_strategy=choice("RATE_LIMIT_STRATEGY", "sliding-window", STRATEGIES),
        rate_limit_close_after=integer("RATE_LIMIT_CLOSE_AFTER", 10, minimum=1),
        handshake_rate_limit=handshake_limit,
        handshake_rate_limits=handshake_limits,
        max_connections_per_client=integer("MAX_CONNECTIONS_PER_CLIENT", 10, minimum=1),
        max_message_bytes=integer("MAX_MESSAGE_BYTES", 65536, minimum=64),
        # At least 1 MiB: what our transport's write buffer may hold on its own (see Session.writable) stays under half.
        send_queue_bytes=integer("SEND_QUEUE_BYTES", 4 * 1024 * 1024, minimum=1024 * 1024),
        max_subscriptions=integer("MAX_SUBSCRIPTIONS", 128, minimum=1),
        history_size=history_size,
        history_ttl=history_ttl,
        history_max_bytes=integer("HISTORY_MAX_BYTES", 64 * 1024 * 1024, minimum=65536),
        handler_timeout=handler_timeout,
        stream_timeout=stream_timeout,
        max_inflight=integer("MAX_INFLIGHT", 8, minimum=1),
        rpc_proxy_url=proxy_url,
        rpc_proxy_secret=proxy_secret,
        rpc_proxy_events=proxy_events,
        channels_file=Path(get("CHANNELS_FILE")) if get("CHANNELS_FILE") else None,
        allowed_origins=origins,
        forwarded_allow_ips=tuple(proxies),
        storage_url=storage_url,
        revocation_file=path("REVOCATION_FILE", "certs/revocations.json"),
        api_keys_file=path("API_KEYS_FILE", "certs/api-keys.json"),
        tls_certfile=path("TLS_CERTFILE", "certs/server.crt"),
        tls_keyfile=path("TLS_KEYFILE", "certs/server.key"),
        tls_client_ca=Path(client_ca) if client_ca else None,
        tls_min_version=choice("TLS_MIN_VERSION", "1.2", ("1.2", "1.3")),
        log_format=choice("LOG_FORMAT", "text", ("text", "json")),
        demo=choice("DEMO", "0", ("0", "1")) == "1",
        internal_port=_port(get("INTERNAL_PORT"), "SECURE_WS_INTERNAL_PORT"),
    )
    if not settings.issuer:
        raise ConfigError("SECURE_WS_JWT_ISSUER", "must not be empty")
    if not settings.audience:
        raise ConfigError("SECURE_WS_JWT_AUDIENCE", "must not be empty")
    prefix = "SECURE_WS_"
    known = sorted(n[len(prefix):] for n in read)  # compared without the prefix every name shares
    warnings = []
    for name in sorted(n for n in source if n.startswith(prefix) and n not in read):
        where = "the environment" if name in real else str(env_file)
        nearest = difflib.get_close_matches(name[len(prefix):], known, n=1, cutoff=0.6)
        hint = f"did you mean {prefix}{nearest[0]}?" if nearest else "see .env.example for the variables"
        warnings.append(f"{name} (from {where}) is not a secure_ws variable and is ignored; {hint}")
    return replace(settings, warnings=tuple(warnings))


def _port(raw: str, variable: str) -> int | None:
    if not raw:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ConfigError(variable, f"not a TCP port: {raw[:20]!r}")
    return int(raw)
