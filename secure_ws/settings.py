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
import io
import ipaddress
import os
import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv.parser import parse_stream
from limits import RateLimitItem, parse_many

from .files import UntrustedFile, read_trusted, shown
from .state.redis_url import parse_redis_url  # pure parsing, no import of redis or of the rest of state

ASYMMETRIC_ALGORITHMS = frozenset(
    {"EdDSA", "ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
STRATEGIES = ("sliding-window", "moving-window", "fixed-window")
MIN_SECRET_BYTES = 32
MAX_ENV_FILE_BYTES = 1 << 20  # a .env holds a few dozen lines; a larger one is refused, not read
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
        """Channels keep history: off when either its size or its TTL is 0."""
        return self.history_size > 0 and self.history_ttl > 0


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` pairs of a dotenv file; a line that cannot be parsed is a :class:`ConfigError`
    naming the file and the line number (never the line itself: it may hold a secret)."""
    values: dict[str, str] = {}
    try:
        text = read_trusted(path, MAX_ENV_FILE_BYTES).decode("utf-8")
    except UntrustedFile as exc:
        raise ConfigError(shown(path), str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(shown(path), f"cannot be read: {exc.__class__.__name__}") from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            raise ConfigError(
                shown(path), f"line {binding.original.line} cannot be parsed (use KEY=value; export, quotes and # comments work)"
            )
        if binding.key is not None and binding.value is not None:  # a bare `KEY` line sets nothing
            values[binding.key] = binding.value
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


def check_internal_port(settings: Settings, port: int) -> None:
    """The internal listener on the public port would serve ``/metrics`` and ``/api/*`` to everyone and
    refuse every WebSocket there; refused whether the port came from the flag or the environment."""
    if settings.internal_port is not None and settings.internal_port == port:
        raise ConfigError(
            "SECURE_WS_INTERNAL_PORT", f"{port} is also the public port (--port): the internal listener needs a port of its own"
        )


_reported: set[str] = set()


def unreported_warnings(settings: Settings) -> list[str]:
    """``settings.warnings`` not yet reported by this process (settings are loaded more than once
    in ``secure-ws serve``: by the command, then by the app)."""
    fresh = [w for w in settings.warnings if w not in _reported]
    _reported.update(fresh)
    return fresh


class Kind:
    """How one variable's text becomes a value: ``parse`` raises ``ValueError`` with the problem (the loader
    prefixes the variable's name), ``bound`` says in words what is accepted (shown in the reference)."""

    __slots__ = ("parse", "bound", "empty_is_default")

    def __init__(self, parse: Callable[[str], Any], bound: str, empty_is_default: bool = False) -> None:
        self.parse = parse
        self.bound = bound
        self.empty_is_default = empty_is_default  # set but empty means the default (file paths); else it is parsed as is


def _integer(minimum: int = 0, maximum: int | None = None) -> Kind:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"not an integer: {raw!r}") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ValueError(f"at most {maximum}, got {value}")
        return value

    return Kind(parse, f"integer, {minimum}..{maximum}" if maximum is not None else f"integer ≥ {minimum}")


def _choice(*choices: str) -> Kind:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {raw!r}")
        return raw

    return Kind(parse, "one of " + ", ".join(f"`{c}`" for c in choices))


def _limits(raw: str) -> tuple[str, tuple[RateLimitItem, ...]]:
    try:
        items = tuple(parse_many(raw))
    except ValueError:
        items = ()
    if not items:
        raise ValueError(f"not a rate limit: {raw!r} (use e.g. 20/second or 20/second;600/minute)")
    return raw, items


def _secret(raw: str) -> bytes | None:
    if not raw:
        return None
    secret = raw.encode()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"too weak: {len(secret)} bytes, at least {MIN_SECRET_BYTES} required")
    return secret


def _algorithms(raw: str) -> tuple[str, ...]:
    algorithms = tuple(a.strip() for a in raw.split(",") if a.strip())
    if not algorithms:
        raise ValueError("empty allow-list")
    for alg in algorithms:
        if alg.lower() == "none":
            raise ValueError("'none' (unsigned tokens) is never accepted")
        if alg not in ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS:
            raise ValueError(f"unknown algorithm {alg!r}")
    return algorithms


def _jwks_url(raw: str) -> str | None:
    if raw and not raw.startswith("https://"):
        raise ValueError("must be an https:// URL")
    return raw or None


def _not_empty(raw: str) -> str:
    if not raw:
        raise ValueError("must not be empty")
    return raw


def _origins(raw: str) -> frozenset[str]:
    origins = frozenset(o.strip() for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"not an origin: {origin!r} (use scheme://host[:port], no path)")
    return origins


def _networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for entry in (e.strip() for e in raw.split(",")):
        if entry == "*":
            proxies += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
        elif entry:
            try:
                proxies.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(f"not an IP address or network: {entry[:100]!r}") from None
    return tuple(proxies)


def _storage_url(raw: str) -> str:
    if raw != "memory://":
        try:
            parse_redis_url(raw)
        except ValueError as exc:
            raise ValueError(f"{exc} (or memory://)") from None
    return raw


def _proxy_url(raw: str) -> str | None:
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an https:// URL (or http:// to a loopback address)")
    if parts.scheme == "http" and not loopback_host(parts.hostname):
        # The secret and every client's claims would cross the network in clear.
        raise ValueError(f"http:// only to a loopback address, got host {parts.hostname[:100]!r}; use https://")
    if parts.username or parts.password:
        raise ValueError("must not hold credentials; set SECURE_WS_RPC_PROXY_SECRET")
    return raw


def _proxy_events(raw: str) -> frozenset[str]:
    events = frozenset(e.strip() for e in raw.split(",") if e.strip())
    if events - set(PROXY_EVENTS):
        raise ValueError(f"use a comma-separated list of {', '.join(PROXY_EVENTS)}")
    return events


def _port(raw: str) -> int | None:
    if not raw:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ValueError(f"not a TCP port: {raw[:20]!r}")
    return int(raw)


def _optional_path(raw: str) -> Path | None:
    return Path(raw) if raw else None


DURATION = Kind(parse_duration, "duration: `90`, `90s`, `15m`, `2h`, `1d`")
TIMEOUT = Kind(parse_timeout, "timeout > 0: `10s`, `500ms`, `2.5`, `1m`")
PATH = Kind(Path, "file path (empty: the default)", empty_is_default=True)
OPTIONAL_PATH = Kind(_optional_path, "file path, or empty")
TEXT = Kind(_not_empty, "non-empty text")
SECRET = Kind(_secret, f"empty, or at least {MIN_SECRET_BYTES} bytes (taken as written, not stripped)")
RATE_LIMITS = Kind(_limits, "`limits` notation, several joined by `;` (e.g. `20/second;600/minute`)")


@dataclass(frozen=True)
class Variable:
    """One ``SECURE_WS_*`` variable: the loader, ``.env.example`` and the reference page all read these."""

    name: str  # without the SECURE_WS_ prefix
    default: str  # as written in .env.example; empty: unset
    kind: Kind
    meaning: str  # one line for the reference; .env.example wraps it
    field: str | tuple[str, ...]  # the Settings field(s) the parsed value fills (a tuple: the parser returns one per field)
    secret: bool = False  # taken as written (not stripped), never shown

    @property
    def env(self) -> str:
        return PREFIX + self.name


PREFIX = "SECURE_WS_"
V = Variable
VARIABLES: tuple[Variable, ...] = (
    V("JWKS_FILE", "certs/jwks.json", PATH,
      "Public verification keys (RFC 7517 JWK Set); reloaded within 2 s of a change, or on SIGHUP.", "jwks_file"),
    V("SIGNING_KEYS_FILE", "certs/signing-keys.json", PATH,
      "Private JWK Set (0600) used only by `secure-ws keys …` / `token issue`; never read by the server.", "signing_keys_file"),
    V("JWKS_URL", "", Kind(_jwks_url, "empty, or an `https://` URL"),
      "An identity provider's JWKS endpoint (https only), used beside or instead of the file.", "jwks_url"),
    V("JWT_ALGORITHMS", "EdDSA,ES256,RS256", Kind(_algorithms, "comma-separated JWS algorithms; never `none`"),
      "Algorithm allow-list. `none` is never accepted; HS* only with SECURE_WS_JWT_SECRET and only for the secret.", "algorithms"),
    V("JWT_SECRET", "", SECRET,
      "Optional shared HS secret (at least 32 bytes); needs an HS algorithm in the allow-list.", "jwt_secret", secret=True),
    V("JWT_ISSUER", "secure-ws", TEXT, "Required `iss`, exact match.", "issuer"),
    V("JWT_AUDIENCE", "secure-ws", TEXT, "Required `aud`, exact match (a token's list of audiences may contain it).", "audience"),
    V("JWT_LEEWAY_SECONDS", "30", DURATION, "Clock skew allowed on exp/nbf/iat, in seconds.", "leeway"),
    V("JWT_MAX_TTL", "24h", DURATION,
      "Longest token lifetime (exp - iat) accepted; also how long revocations are kept (e.g. 900, 15m, 24h).", "max_token_ttl"),
    V("RATE_LIMIT", "20/second", RATE_LIMITS,
      "Per-client (per `sub`) message limit in `limits` notation; several joined by `;`.", ("rate_limit", "rate_limits")),
    V("RATE_LIMIT_STRATEGY", "sliding-window", _choice(*STRATEGIES),
      "sliding-window, moving-window or fixed-window.", "rate_limit_strategy"),
    V("RATE_LIMIT_CLOSE_AFTER", "10", _integer(1),
      "Consecutive rejected messages after which the connection is closed 1008 \"rate limit exceeded\".", "rate_limit_close_after"),
    V("HANDSHAKE_RATE_LIMIT", "60/minute", RATE_LIMITS,
      "Handshake attempts per client IP; beyond it HTTP 429 with Retry-After.", ("handshake_rate_limit", "handshake_rate_limits")),
    V("FORWARDED_ALLOW_IPS", "", Kind(_networks, "comma-separated IPs or CIDRs, `*` any; empty: none"),
      "Proxies (IPs or CIDRs, comma-separated; * any) whose X-Forwarded-For names the client for that throttle; empty: none.",
      "forwarded_allow_ips"),
    V("MAX_CONNECTIONS_PER_CLIENT", "10", _integer(1), "Concurrent connections per `sub`.", "max_connections_per_client"),
    V("MAX_MESSAGE_BYTES", "65536", _integer(64), "Largest inbound message in bytes (larger: close 1009).", "max_message_bytes"),
    # At least 1 MiB: what our transport's write buffer may hold on its own (see Session.writable) stays under half.
    V("SEND_QUEUE_BYTES", "4194304", _integer(1024 * 1024),
      "Bytes one connection may leave unread, its transport's write buffer included: past it a publication or push closes it 1008 \"slow consumer\", "
      "and its own replies (echo, history, replays, results) stop the reading of its requests.", "send_queue_bytes"),
    V("MAX_SUBSCRIPTIONS", "128", _integer(1),
      "Channels one connection may hold at once; a subscribe beyond it is answered error `limit_exceeded` (the connection "
      "stays open; re-subscribing to a channel already held does not count).", "max_subscriptions"),
    # At most MAX_HISTORY_SIZE: one recovery sends at most this many messages in one go.
    V("HISTORY_SIZE", "100", _integer(0, MAX_HISTORY_SIZE),
      "Publications each channel keeps for recovery and `history` (0 turns history off: no offsets, no recovery).", "history_size"),
    V("HISTORY_TTL", "5m", DURATION,
      "How long a channel's history is kept after its last publication (0 turns history off).", "history_ttl"),
    V("HISTORY_MAX_BYTES", "67108864", _integer(65536),
      "With memory:// storage, total bytes all channels' history may take in memory: each text as it sits in memory (up to "
      "4 bytes a character) and about 1 KiB per channel record; over it, whole channels go, least recently published first.", "history_max_bytes"),
    V("HANDLER_TIMEOUT", "10s", TIMEOUT,
      "Longest an application handler or hook may run; past it the call is cancelled and answered `timeout`.", "handler_timeout"),
    V("STREAM_TIMEOUT", "5m", TIMEOUT,
      "Longest a streamed reply may last in all (each chunk must still come within SECURE_WS_HANDLER_TIMEOUT); past it `timeout`.",
      "stream_timeout"),
    V("MAX_INFLIGHT", "8", _integer(1),
      "Handler calls one connection may have running at once (streams until they end); a request beyond is answered `busy`.", "max_inflight"),
    V("RPC_PROXY_URL", "", Kind(_proxy_url, "empty, or `https://` (`http://` to loopback only), no credentials"),
      "Backend that answers message types no Python handler claims.", "rpc_proxy_url"),
    V("RPC_PROXY_SECRET", "", SECRET,
      "Bearer secret sent to that backend, at least 32 bytes; required with the URL.", "rpc_proxy_secret", secret=True),
    V("RPC_PROXY_EVENTS", "", Kind(_proxy_events, "empty, or a comma list of `subscribe`, `publish`, `connect`"),
      "Channel and connection events the backend decides on, sent as `$subscribe`, `$publish`, `$connect`; needs the URL.",
      "rpc_proxy_events"),
    V("CHANNELS_FILE", "", OPTIONAL_PATH,
      "TOML `[[channels]]` rules by pattern (history size and TTL, presence, join/leave, client publish), read at start-up; "
      "at most 1 MiB, not writable by others.",
      "channels_file"),
    V("ALLOWED_ORIGINS", "", Kind(_origins, "comma-separated `scheme://host[:port]`, or `*`"),
      "Browser Origin allow-list, comma-separated exact origins; `*` allows any; no Origin (native apps) is allowed.",
      "allowed_origins"),
    V("STORAGE_URL", "memory://", Kind(_storage_url, "`memory://`, `redis://`, `redis+sentinel://`, `redis+cluster://` (`rediss…` for TLS)"),
      "Shared state: memory:// (one process); redis://host:port/db, redis+sentinel://[:pw@]h:p[,h:p…]/SERVICE[/db] or "
      "redis+cluster://h:p[,h:p…] (many workers and hosts); rediss… for TLS, ?ssl_ca_certs=PATH for a private CA.", "storage_url"),
    V("REVOCATION_FILE", "certs/revocations.json", PATH,
      "The durable revocation list, with either storage (Redis holds a copy); shared storage for many hosts.", "revocation_file"),
    V("API_KEYS_FILE", "certs/api-keys.json", PATH,
      "Hashed server-API keys (0600), written by `secure-ws apikey create|revoke`, re-read within 2 s; no file or no key: "
      "/api/* is 404.",
      "api_keys_file"),
    V("TLS_CERTFILE", "certs/server.crt", PATH, "Certificate for `secure-ws serve`.", "tls_certfile"),
    V("TLS_KEYFILE", "certs/server.key", PATH, "Private key for `secure-ws serve`.", "tls_keyfile"),
    V("TLS_MIN_VERSION", "1.2", _choice("1.2", "1.3"), "Lowest TLS version `secure-ws serve` accepts.", "tls_min_version"),
    V("TLS_CLIENT_CA", "", OPTIONAL_PATH, "CA bundle for client certificates: set it to require mTLS in `secure-ws serve`.", "tls_client_ca"),
    V("LOG_FORMAT", "text", _choice("text", "json"), "text or json (one JSON object per line).", "log_format"),
    V("DEMO", "0", Kind(lambda raw: _choice("0", "1").parse(raw) == "1", "`0` or `1`"),
      "1 serves the /demo page (the quickstart turns it on).", "demo"),
    V("INTERNAL_PORT", "", Kind(_port, "empty, or a TCP port 1..65535"),
      "Set by `secure-ws serve --internal-port P`: /metrics and /api/* only on the listener at this local port.", "internal_port"),
)
del V


def env_example() -> str:
    """``.env.example``, written from :data:`VARIABLES` (a test keeps the file equal to this)."""
    lines = [
        "# secure_ws configuration. Copy to .env (read from the working directory); the real environment wins.",
        "# Every variable is optional; the value shown is the default. Dotenv syntax: `export` prefix, quotes",
        "# and trailing ` # comments` work; a misspelt SECURE_WS_* name is warned about at start-up.",
        "# (Generated from secure_ws/settings.py: python -m secure_ws.settings > .env.example)",
    ]
    for variable in VARIABLES:
        lines += [*textwrap.wrap(variable.meaning, 118, initial_indent="# ", subsequent_indent="# ")]
        lines.append(f"{variable.env}={variable.default}")
    return "\n".join(lines) + "\n"


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | os.PathLike[str] | None = ".env"
) -> Settings:
    """Read and validate every ``SECURE_WS_*`` variable of :data:`VARIABLES`, then the rules that tie
    several together; the real environment wins over ``.env``."""
    file_values = read_env_file(Path(env_file)) if env_file is not None and Path(env_file).is_file() else {}
    real = os.environ if environ is None else environ
    source = {**file_values, **real}  # the real environment wins
    values: dict[str, Any] = {}
    for variable in VARIABLES:
        text = source.get(variable.env, variable.default)
        text = text if variable.secret else text.strip()
        try:
            value = variable.kind.parse(text or variable.default if variable.kind.empty_is_default else text)
        except ValueError as exc:
            raise ConfigError(variable.env, str(exc)) from None
        if isinstance(variable.field, tuple):
            values.update(zip(variable.field, value, strict=True))
        else:
            values[variable.field] = value
    settings = Settings(
        **values,
        # The default path may be absent when an IdP URL supplies the keys.
        jwks_file_required=bool(source.get("SECURE_WS_JWKS_FILE", "").strip()) or values["jwks_url"] is None,
    )
    _check_together(settings)
    return replace(settings, warnings=_misspelt(source, real, env_file))


def _check_together(settings: Settings) -> None:
    """The rules no single variable can check on its own."""
    hmac_named = [a for a in settings.algorithms if a in HMAC_ALGORITHMS]
    if settings.jwt_secret is not None and not hmac_named:
        raise ConfigError("SECURE_WS_JWT_SECRET", "is set but SECURE_WS_JWT_ALGORITHMS names no HS algorithm (add HS256)")
    if settings.jwt_secret is None and hmac_named:
        raise ConfigError("SECURE_WS_JWT_ALGORITHMS", f"{hmac_named[0]} is allowed but SECURE_WS_JWT_SECRET is not set")
    if settings.rpc_proxy_url is not None and settings.rpc_proxy_secret is None:
        raise ConfigError("SECURE_WS_RPC_PROXY_SECRET", "must be set when SECURE_WS_RPC_PROXY_URL is")
    if settings.rpc_proxy_secret is not None and settings.rpc_proxy_url is None:
        raise ConfigError("SECURE_WS_RPC_PROXY_SECRET", "is set but SECURE_WS_RPC_PROXY_URL is not")
    if settings.rpc_proxy_events and settings.rpc_proxy_url is None:
        raise ConfigError("SECURE_WS_RPC_PROXY_EVENTS", "is set but SECURE_WS_RPC_PROXY_URL is not")


def _misspelt(source: Mapping[str, str], real: Mapping[str, str], env_file: object) -> tuple[str, ...]:
    """A ``SECURE_WS_*`` name set but not in :data:`VARIABLES` is a misspelling: a warning naming the nearest real one."""
    known = sorted(v.name for v in VARIABLES)  # compared without the prefix every name shares
    names = {v.env for v in VARIABLES}
    warnings = []
    for name in sorted(n for n in source if n.startswith(PREFIX) and n not in names):
        where = "the environment" if name in real else str(env_file)
        nearest = difflib.get_close_matches(name[len(PREFIX):], known, n=1, cutoff=0.6)
        hint = f"did you mean {PREFIX}{nearest[0]}?" if nearest else "see .env.example for the variables"
        warnings.append(f"{name} (from {where}) is not a secure_ws variable and is ignored; {hint}")
    return tuple(warnings)


if __name__ == "__main__":  # python -m secure_ws.settings > .env.example
    print(env_example(), end="")
