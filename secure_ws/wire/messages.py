"""The JSON message schema: parsing, replies and error frames, with no I/O.

Kept apart from the session like ``websockets`` keeps its protocol apart from
its transport, so hostile input can be fuzzed here without a socket.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

MAX_CHANNEL_CHARS = 128
CHANNEL = re.compile(rf"[A-Za-z0-9_.:-]{{1,{MAX_CHANNEL_CHARS}}}")

BAD_REQUEST = "bad_request"  # not a JSON object with a string type, a bad field, or data that fails validation
UNKNOWN_TYPE = "unknown_type"  # no built-in type, handler or RPC proxy answers that type
FORBIDDEN = "forbidden"  # the token's scope does not grant it
RATE_LIMITED = "rate_limited"  # over the per-sub or a handler's limit; carries retry_after_ms
LIMIT_EXCEEDED = "limit_exceeded"  # one subscription too many (SECURE_WS_MAX_SUBSCRIPTIONS)
# Only sent while Redis is unreachable, when a publish or subscribe cannot be done.
UNAVAILABLE = "unavailable"  # shared storage (or the RPC proxy's backend) cannot answer now

MessageId = str | int | None


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, id: MessageId = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


def _refuse_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; echoing them back would send invalid JSON.
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (_INF, -_INF):  # 1e400 parses to inf, which would go back out as the non-JSON `Infinity`
        raise ValueError("number out of range")
    return value


_INF = float("inf")
# Decoding stays with the standard library: orjson turns integers beyond 64 bits into floats, and an
# echo must give back exactly what it was sent. Encoding goes to orjson (4x faster on our replies,
# measured with scripts/microbench.py), with the standard encoder for what orjson cannot take.
_decoder = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False, allow_nan=False)


def encode(obj: Any) -> str:
    """Compact JSON text, or ``TypeError`` for what is not JSON, ``UnicodeEncodeError`` for a string no UTF-8
    can carry (a lone surrogate). (NaN and infinities, which no decoded request holds, come out as ``null``.)"""
    try:
        return orjson.dumps(obj).decode()
    except TypeError:
        # Integers beyond 64 bits (a client may echo them), and lone surrogates (which orjson refuses). Anything
        # really not JSON raises TypeError from there too.
        text = _encoder.encode(obj)
        text.encode()  # a lone surrogate raises here, where the caller expects a failure, not later at the send
        return text


def _parse(text: str) -> Any:
    # JSONDecoder.decode runs two whitespace regexes around the C scanner; a request without
    # surrounding whitespace needs neither, and anything else goes the stock way.
    try:
        value, end = _decoder.scan_once(text, 0)  # type: ignore[attr-defined]  # set by JSONDecoder.__init__
    except StopIteration:
        return _decoder.decode(text)
    return value if end == len(text) else _decoder.decode(text)


def parse(text: str) -> Any:
    """Any JSON value, as strictly as requests are read (no NaN or infinities); ``ValueError`` otherwise,
    nesting too deep for the parser included."""
    try:
        return _parse(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def carriable(text: str, value: Any) -> bool:
    """Whether ``value``, decoded from JSON ``text``, can go out again as UTF-8 JSON. A \\ud800-\\udfff escape
    may decode to a lone surrogate, which no UTF-8 can carry; text read from a socket or decoded from UTF-8 is
    valid already, so only a text with such an escape needs the (costly) check."""
    if "\\ud" not in text and "\\uD" not in text:
        return True
    try:
        encode(value).encode()
    except (UnicodeEncodeError, RecursionError):
        return False
    return True


def decode(text: str) -> dict[str, Any]:
    """A request object with a string ``type`` and a valid ``id``, or :class:`ProtocolError`."""
    try:
        message = _parse(text)
    except (ValueError, RecursionError):
        raise ProtocolError(BAD_REQUEST, "not valid JSON") from None
    if type(message) is not dict:
        raise ProtocolError(BAD_REQUEST, "a request must be a JSON object")
    if not carriable(text, message):
        raise ProtocolError(BAD_REQUEST, "lone surrogate in a string", _safe_id(message))
    id = message.get("id")
    if id is not None and (type(id) is not str and type(id) is not int or len(str(id)) > 128):
        raise ProtocolError(BAD_REQUEST, "id must be a string or an integer (at most 128 characters)")
    if type(message.get("type")) is not str:
        raise ProtocolError(BAD_REQUEST, "missing or non-string 'type'", id)
    return message


def _safe_id(message: dict[str, Any]) -> MessageId:
    id = message.get("id")
    if type(id) is str:
        try:
            id.encode()
        except UnicodeEncodeError:
            return None
    return id if type(id) in (str, int) else None


def error(code: str, message: str, id: MessageId = None, **extra: Any) -> str:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if id is not None:
        frame["id"] = id
    frame.update(extra)
    return encode(frame)


def reply(request: dict[str, Any], frame: dict[str, Any]) -> str:
    id = request.get("id")
    if id is not None:
        frame["id"] = id
    return encode(frame)


def check_channel(channel: Any) -> str:
    """``channel`` if it is a channel name (``^[A-Za-z0-9_.:-]{1,128}$``), else ``ValueError``."""
    if type(channel) is not str or not CHANNEL.fullmatch(channel):
        raise ValueError(f"channel must match ^{CHANNEL.pattern}$")
    return channel


def message_head(channel: str, data: Any, sender: str | None = None) -> str:
    """``{"type":"message","channel":C,"from":sender,"data":data}`` (no ``from`` without a sender) encoded without
    its closing brace, as storage's ``publish`` takes it: storage appends ``,"offset":N,"epoch":"E"}`` (or just
    the brace with history off). ``ValueError`` for a bad channel, ``TypeError`` for data that is not JSON."""
    message: dict[str, Any] = {"type": "message", "channel": check_channel(channel)}
    if sender is not None:
        message["from"] = sender
    message["data"] = data
    return encode(message)[:-1]


def channel_of(request: dict[str, Any]) -> str:
    try:
        return check_channel(request.get("channel"))
    except ValueError as exc:
        raise ProtocolError(BAD_REQUEST, str(exc), request.get("id")) from None


MAX_OFFSET = 2**53  # offsets are JSON numbers: beyond this, not every client reads them exactly
MAX_EPOCH_CHARS = 64


SINCE_SHAPE = f'since must be {{"offset": an integer 0..2^53, "epoch": a string of 1..{MAX_EPOCH_CHARS} characters}}'
LIMIT_SHAPE = "limit must be a non-negative integer"


def parse_since(since: Any) -> tuple[int, str]:
    """A ``since`` position (SPEC §11) as (offset, epoch). Strict: anything but an object of exactly a non-negative
    integer ``offset`` (at most 2^53) and a short string ``epoch`` is a ``ValueError``."""
    if (
        type(since) is not dict
        or since.keys() != {"offset", "epoch"}
        or type(since["offset"]) is not int
        or not 0 <= since["offset"] <= MAX_OFFSET
        or type(since["epoch"]) is not str
        or not 0 < len(since["epoch"]) <= MAX_EPOCH_CHARS
    ):
        raise ValueError(SINCE_SHAPE)
    return since["offset"], since["epoch"]


def parse_limit(limit: Any, maximum: int) -> int:
    """A ``limit``: a non-negative integer (``ValueError`` otherwise), clamped to ``maximum``."""
    if type(limit) is not int or limit < 0:
        raise ValueError(LIMIT_SHAPE)
    return min(limit, maximum)


def since_of(request: dict[str, Any]) -> tuple[int, str] | None:
    """A request's ``since``, None when absent; ``bad_request`` when malformed."""
    if "since" not in request:
        return None
    try:
        return parse_since(request["since"])
    except ValueError:
        raise ProtocolError(BAD_REQUEST, SINCE_SHAPE, request.get("id")) from None


def limit_of(request: dict[str, Any], maximum: int) -> int:
    """A request's ``limit``, ``maximum`` when absent; ``bad_request`` when malformed."""
    if "limit" not in request:
        return maximum
    try:
        return parse_limit(request["limit"], maximum)
    except ValueError:
        raise ProtocolError(BAD_REQUEST, LIMIT_SHAPE, request.get("id")) from None
