"""The JSON message schema (SPEC §5): parsing, replies and channel rights, with no I/O.

Kept apart from :mod:`session` like ``websockets`` keeps its protocol apart from
its transport, so hostile input can be fuzzed here without a socket.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

MAX_CHANNEL_CHARS = 128
CHANNEL = re.compile(rf"[A-Za-z0-9_.:-]{{1,{MAX_CHANNEL_CHARS}}}")

BAD_REQUEST = "bad_request"
UNKNOWN_TYPE = "unknown_type"
FORBIDDEN = "forbidden"
RATE_LIMITED = "rate_limited"
LIMIT_EXCEEDED = "limit_exceeded"
# Not in SPEC §5's list: only sent while Redis is unreachable, when a publish or subscribe cannot be done.
UNAVAILABLE = "unavailable"

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
    """Compact JSON text, or ``TypeError`` for what is not JSON. (NaN and infinities, which no decoded
    request holds, come out as ``null``.)"""
    try:
        return orjson.dumps(obj).decode()
    except TypeError:
        # Integers beyond 64 bits (a client may echo them), and lone surrogates, which the standard
        # encoder writes as escapes. Anything really not JSON raises TypeError from there too.
        return _encoder.encode(obj)


def _parse(text: str) -> Any:
    # JSONDecoder.decode runs two whitespace regexes around the C scanner; a request without
    # surrounding whitespace needs neither, and anything else goes the stock way.
    try:
        value, end = _decoder.scan_once(text, 0)  # type: ignore[attr-defined]  # set by JSONDecoder.__init__
    except StopIteration:
        return _decoder.decode(text)
    return value if end == len(text) else _decoder.decode(text)


def decode(text: str) -> dict[str, Any]:
    """A request object with a string ``type`` and a valid ``id``, or :class:`ProtocolError`."""
    try:
        message = _parse(text)
    except (ValueError, RecursionError):
        raise ProtocolError(BAD_REQUEST, "not valid JSON") from None
    if type(message) is not dict:
        raise ProtocolError(BAD_REQUEST, "a request must be a JSON object")
    if "\\ud" in text or "\\uD" in text:
        # A \ud800-\udfff escape may decode to a lone surrogate, which no reply could carry as UTF-8.
        # Real text from the socket is valid UTF-8 already, so only escapes need this check.
        try:
            encode(message).encode()
        except UnicodeEncodeError:
            raise ProtocolError(BAD_REQUEST, "lone surrogate in a string", _safe_id(message)) from None
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


def channel_of(request: dict[str, Any]) -> str:
    channel = request.get("channel")
    if type(channel) is not str or not CHANNEL.fullmatch(channel):
        raise ProtocolError(BAD_REQUEST, "channel must match ^[A-Za-z0-9_.:-]{1,128}$", request.get("id"))
    return channel


class Glob:
    """A scope pattern where only ``*`` is special: it matches any run of characters, even empty.

    Matched without regular expressions or backtracking: the literal pieces between stars are
    found left to right with ``str.find``, each from where the previous one ended, so a check costs
    at most len(pattern) x len(channel) character comparisons, done in C. Taking the leftmost
    occurrence is always safe for ``*``-only globs (a later one leaves less room for the pieces
    after it). A ``.*`` regex backtracks instead: every star multiplies the work on a channel that
    fails, and ``*.*.*.*.*.*.x`` against 127 dots held a worker's only thread for ~40 s.
    """

    __slots__ = ("_head", "_middle", "_tail", "_shortest")

    def __init__(self, pattern: str) -> None:
        head, *rest = pattern.split("*")
        self._head = head
        if not rest:  # no star: the pattern is the channel's exact name
            self._middle: tuple[str, ...] | None = None
            self._tail = ""
        else:
            self._tail = rest.pop()
            self._middle = tuple(piece for piece in rest if piece)  # "a**b" is "a*b"
        self._shortest = len(pattern) - pattern.count("*")

    def matches(self, channel: str) -> bool:
        if self._middle is None:
            return channel == self._head
        if len(channel) < self._shortest or not channel.startswith(self._head) or not channel.endswith(self._tail):
            return False
        position = len(self._head)
        end = len(channel) - len(self._tail)  # the tail is matched already: middle pieces must end before it
        for piece in self._middle:
            found = channel.find(piece, position, end)
            if found < 0:
                return False
            position = found + len(piece)
        return True


def _globs(scopes: tuple[str, ...], prefix: str) -> tuple[Glob, ...]:
    # A pattern whose literal characters outnumber the longest channel name can match nothing: it is
    # dropped here, so what is searched per check is never longer than a channel name.
    patterns = dict.fromkeys(s[len(prefix):] for s in scopes if s.startswith(prefix))  # duplicates checked once
    return tuple(Glob(p) for p in patterns if len(p) - p.count("*") <= MAX_CHANNEL_CHARS)


class Grants:
    """Channel rights from the token's ``scope``: ``subscribe:<glob>`` and ``publish:<glob>``.

    Built once per connection (and per refresh), so a frame's check is only the matching. Bounds:
    a kept pattern has at most MAX_CHANNEL_CHARS (128) literal characters; how many patterns a token
    carries is bounded by its size (``tokens.MAX_TOKEN_CHARS``, 8192: at most ~6 KB of claims, a few
    hundred distinct patterns, a check of well under a millisecond even then). Duplicates count once.
    """

    __slots__ = ("_subscribe", "_publish")

    def __init__(self, scopes: tuple[str, ...]) -> None:
        self._subscribe = _globs(scopes, "subscribe:")
        self._publish = _globs(scopes, "publish:")

    def may_subscribe(self, channel: str) -> bool:
        return any(g.matches(channel) for g in self._subscribe)

    def may_publish(self, channel: str) -> bool:
        return any(g.matches(channel) for g in self._publish)
