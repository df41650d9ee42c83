"""Logging: one redaction filter on every logger and handler, and an optional JSON format.

uvicorn logs the request path *with its query string* for every WebSocket
(`"WebSocket /ws?access_token=eyJ…" [accepted]`), so redaction cannot be left to
our own log calls: the filter rewrites any record, whoever emits it.

Every handler of ours and uvicorn's gets one formatter: text lines start with an
ISO 8601 UTC timestamp; JSON lines are objects, and uvicorn's access and
WebSocket lines carry their parts as fields (``method``, ``path`` without its
query string, ``status``, ``client``). uvicorn's records hold no duration.
"""

from __future__ import annotations

import json
import logging
import re
import time

_REDACTIONS = (
    # Query strings are never logged: a token may hide in one under any (percent-encoded) name.
    (re.compile(r"(/[^\s?\"']*)\?[^\s\"']+"), r"\1?[redacted]"),
    # token-bearing parameters wherever they appear without a path
    (re.compile(r"(?i)((?:access_token|token)=)[^&\s\"']+"), r"\1[redacted]"),
    # anything shaped like a JWS/JWE compact serialisation
    (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){1,3}"), "[redacted-jwt]"),
    # server-API keys (secure_ws.auth.api_keys), wherever one was pasted
    (re.compile(r"swk_[A-Za-z0-9_-]{8,}"), "swk_[redacted]"),
    # bearer credentials in headers or subprotocols
    (re.compile(r"(?i)(bearer[ .])[A-Za-z0-9_.~+/=-]+"), r"\1[redacted]"),
)

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: each can end a log line
# (CR, LF, VT, FF, NEL, U+2028/2029 to str.splitlines and to log viewers) or drive a terminal (ESC).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]}
# Tracebacks are multi-line by design; their line breaks are kept, every other control is escaped.
_TRACEBACK_ESCAPES = {c: e for c, e in _ESCAPES.items() if c != 0x0A}

# The structured fields our records carry (``extra=``); the JSON format writes them out.
FIELDS = ("connection_id", "sub", "event", "close_code", "reason", "client")

LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "websockets", "websockets.server", "secure_ws")

_ACCESS = '%s - "%s %s HTTP/%s" %d'  # uvicorn.access: client, method, path, HTTP version, status
_WEBSOCKET = '%s - "WebSocket %s" '  # uvicorn.error: client, path, then [accepted], 403 or a status


def iso_time(created: float) -> str:
    """``2026-12-04T17:31:33.123Z``: ISO 8601, UTC, milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created * 1000) % 1000:03d}Z"


def _without_query(path: object) -> str:
    return str(path).split("?", 1)[0]


def request_fields(record: logging.LogRecord) -> dict[str, object]:
    """The parts of a uvicorn access or WebSocket line, as fields (empty for any other record)."""
    args = record.args
    if not isinstance(args, tuple) or not isinstance(record.msg, str):
        return {}
    if record.msg == _ACCESS and len(args) == 5:
        client, method, path, version, status = args
        return {"event": "http", "client": client, "method": method, "path": _without_query(path), "http_version": version, "status": status}
    if record.msg.startswith(_WEBSOCKET) and len(args) >= 2:
        result = (record.msg[len(_WEBSOCKET):] % args[2:]).strip("[]")
        # a 403 or other status, or "accepted"
        return {"event": "websocket", "client": args[0], "method": "GET", "path": _without_query(args[1]),
                "status": int(result) if result.isdigit() else result}
    return {}


def redact(text: str) -> str:
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def escape_controls(text: str) -> str:
    """``\\x1b``-style escapes for control characters, so that one record stays one line of plain text."""
    return text.translate(_ESCAPES) if _CONTROL.search(text) else text


def _clean(arg: object) -> object:
    # Numbers stay numbers for %d; anything else is logged as its redacted, escaped text.
    if arg is None or isinstance(arg, (int, float)):
        return arg
    return escape_controls(redact(arg if isinstance(arg, str) else str(arg)))


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # Redact the arguments in place rather than flattening the message: formatters such as
        # uvicorn's AccessFormatter unpack record.args themselves.
        # Every value a client can influence (a sub, a path, a header) arrives in msg, args or one of
        # the structured fields; escaping all of them here covers every logger and formatter.
        # Escaping is idempotent (a backslash is not a control), so a second pass through a handler's
        # copy of this filter changes nothing.
        if isinstance(record.msg, str):
            record.msg = escape_controls(redact(record.msg))
        else:
            record.msg = _clean(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_clean(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _clean(v) for k, v in record.args.items()}
        for name in FIELDS:
            value = record.__dict__.get(name)
            if isinstance(value, str):
                setattr(record, name, escape_controls(value))
        if record.exc_info and record.exc_text is None and record.exc_info[0] is not None:
            text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_text = text.translate(_TRACEBACK_ESCAPES) if _CONTROL.search(text) else text
        return True


class TextFormatter(logging.Formatter):
    """``2026-12-04T17:31:33.123Z INFO     uvicorn.error Started server process [7]``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-8s %(name)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return iso_time(record.created)


class JsonFormatter(logging.Formatter):
    FIELDS = FIELDS

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(request_fields(record))
        for name in self.FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


_FILTER = RedactingFilter()


def configure(log_format: str) -> None:
    """Install the filter everywhere records can pass; idempotent."""
    if not logging.getLogger("secure_ws").handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        logger = logging.getLogger("secure_ws")
        logger.addHandler(handler)
        # Follow the server's --log-level (uvicorn configures its loggers before importing the app).
        uvicorn_level = logging.getLogger("uvicorn.error").level
        logger.setLevel(uvicorn_level or logging.INFO)
        logger.propagate = False
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        for existing in logger.handlers:
            if _FILTER not in existing.filters:
                existing.addFilter(_FILTER)
            if log_format == "json":
                existing.setFormatter(JsonFormatter())
            elif existing.formatter is None or type(existing.formatter).__module__.startswith("uvicorn"):
                # ours and uvicorn's get timestamps; a host application's own formatters are left alone
                existing.setFormatter(TextFormatter())
