"""Channel options by pattern: history size and TTL, presence, join/leave events, client publish.

The one place that decides what a channel may do. Every path asks it: a client's subscribe, publish, history
and presence requests, the server API and ``api.publish`` (through storage, which takes each channel's history
limits from here), :class:`secure_ws.Publisher` (which builds the same rules from the same settings and file).

Rules come from ``api.channels(pattern, …)`` and from ``SECURE_WS_CHANNELS_FILE`` (TOML, ``[[channels]]``
tables); patterns use the scope glob syntax (only ``*`` is special) and the first rule whose pattern matches a
channel wins, the file's rules before the application's (an operator can tune a deployed application without
touching its code). A channel no rule matches takes the ``SECURE_WS_HISTORY_*`` defaults with everything else on.
An option a rule leaves out takes the same default.

A channel's options are found once and then remembered (a dict lookup): at most ``CACHE_SIZE`` channels are
remembered; past that the memory is emptied and refilled, so an attacker cycling through channel names costs a
scan of the rules per name, never unbounded memory.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..auth.scopes import Glob
from ..files import UntrustedFile, read_trusted, shown
from ..settings import MAX_HISTORY_SIZE, Settings, parse_duration
from ..wire.messages import CHANNEL, MAX_CHANNEL_CHARS
from .storage import HistoryLimits

CACHE_SIZE = 10_000  # channels whose options are remembered (≤ ~10,000 × (128-character name + entry) ≈ 3 MB)
MAX_RULES = 1_000  # rules in all (code and file): a channel seen for the first time is matched against each
MAX_FILE_BYTES = 1 << 20  # SECURE_WS_CHANNELS_FILE is read only up to this size
MAX_HISTORY_TTL = 30 * 86400  # seconds; longer is a database, not a recovery buffer
OPTIONS = ("history_size", "history_ttl", "presence", "join_leave", "client_publish")


@dataclass(frozen=True, slots=True)
class ChannelOptions:
    """What one channel may do: its history limits (None: no history), whether ``presence`` requests and
    ``join_leave`` events are answered, whether clients may ``publish`` to it."""

    history: HistoryLimits | None
    presence: bool = True
    join_leave: bool = True
    client_publish: bool = True


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated ``channels`` entry; options it leaves out are None (the defaults)."""

    pattern: str
    history_size: int | None = None
    history_ttl: int | None = None
    presence: bool | None = None
    join_leave: bool | None = None
    client_publish: bool | None = None


def rule(entry: Mapping[str, Any], where: str) -> Rule:
    """A rule from ``entry`` (``pattern`` and options); ``ValueError`` naming ``where`` and what is wrong."""
    unknown = [key for key in entry if key != "pattern" and key not in OPTIONS]
    if unknown:
        raise ValueError(f"{where}: unknown key {str(unknown[0])[:40]!r} (known: pattern, {', '.join(OPTIONS)})")
    pattern = entry.get("pattern")
    if type(pattern) is not str:
        raise ValueError(f"{where}: 'pattern' must be a string, like \"room.*\"")
    literal = pattern.replace("*", "")
    if not pattern or len(literal) > MAX_CHANNEL_CHARS or (literal and not CHANNEL.fullmatch(literal)):
        raise ValueError(
            f"{where}: pattern {pattern[:60]!r} matches no channel (channel names match ^{CHANNEL.pattern}$; '*' matches any run)"
        )
    size = entry.get("history_size")
    if size is not None and (type(size) is not int or not 0 <= size <= MAX_HISTORY_SIZE):
        raise ValueError(f"{where}: history_size must be an integer from 0 to {MAX_HISTORY_SIZE}, got {str(size)[:40]}")
    ttl = entry.get("history_ttl")
    if ttl is not None:
        try:
            if type(ttl) is int:
                seconds = ttl
            elif type(ttl) is str:
                seconds = parse_duration(ttl)
            else:
                raise ValueError(f"history_ttl must be a duration like \"10m\" or a number of seconds, got {type(ttl).__name__}")
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if not 0 <= seconds <= MAX_HISTORY_TTL:
            raise ValueError(f"{where}: history_ttl must be from 0 to {MAX_HISTORY_TTL}s (30d), got {seconds}")
        ttl = seconds
    flags = {}
    for name in ("presence", "join_leave", "client_publish"):
        value = entry.get(name)
        if value is not None and type(value) is not bool:
            raise ValueError(f"{where}: {name} must be true or false, got {type(value).__name__}")
        flags[name] = value
    return Rule(pattern, size, ttl, **flags)


def read_file(path: Path) -> list[Rule]:
    """The rules of a ``SECURE_WS_CHANNELS_FILE``: ``ValueError`` naming the file and the bad entry. Like the
    other files the server trusts, it must not be writable by group or others (whoever can write it can turn a
    channel's rules off), and it is read only up to ``MAX_FILE_BYTES``."""
    try:
        raw = read_trusted(path, MAX_FILE_BYTES)
    except UntrustedFile as exc:
        raise ValueError(f"{shown(path)}: {exc}") from None
    except OSError as exc:
        raise ValueError(f"{shown(path)}: cannot be read: {exc.strerror or exc.__class__.__name__}") from None
    try:
        document = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: not TOML: {str(exc)[:200]}") from None
    extra = [key for key in document if key != "channels"]
    if extra:
        raise ValueError(f"{path}: unknown key {extra[0][:40]!r} (only [[channels]] tables)")
    entries = document.get("channels", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{path}: 'channels' must be [[channels]] tables")
    return [rule(entry, f"{path}: [[channels]] #{n} ({str(entry.get('pattern', '?'))[:60]!r})") for n, entry in enumerate(entries, 1)]


class ChannelRules:
    """``rules(channel)`` → its :class:`ChannelOptions` (the first matching rule's, else the defaults)."""

    __slots__ = ("default", "_rules", "_cache")

    def __init__(self, settings: Settings, rules: Iterable[Rule] = ()) -> None:
        limits = HistoryLimits.of(settings)
        self.default = ChannelOptions(_history(limits, None, None))
        resolved = []
        for r in rules:
            options = ChannelOptions(
                _history(limits, r.history_size, r.history_ttl),
                _default(r.presence), _default(r.join_leave), _default(r.client_publish),
            )
            resolved.append((Glob(r.pattern), options))
        if len(resolved) > MAX_RULES:
            raise ValueError(f"at most {MAX_RULES} channel rules, got {len(resolved)}")
        self._rules = tuple(resolved)
        self._cache: dict[str, ChannelOptions] = {}  # bound: CACHE_SIZE entries

    @classmethod
    def load(cls, settings: Settings, declared: Iterable[Rule] = ()) -> ChannelRules:
        """The file's rules (``SECURE_WS_CHANNELS_FILE``), then ``declared`` (the application's): ``ValueError``
        naming the bad entry."""
        path = settings.channels_file
        return cls(settings, [*(read_file(path) if path is not None else ()), *declared])

    def __call__(self, channel: str) -> ChannelOptions:
        found = self._cache.get(channel)
        if found is not None:
            return found
        found = self.default
        for glob, options in self._rules:
            if glob.matches(channel):
                found = options
                break
        cache = self._cache
        if len(cache) >= CACHE_SIZE:
            cache.clear()
        cache[channel] = found
        return found

    def history(self, channel: str) -> HistoryLimits | None:
        """The channel's history limits, None when it keeps none: what storage asks on every append and read."""
        found = self._cache.get(channel)
        return (found if found is not None else self(channel)).history


def _history(limits: HistoryLimits, size: int | None, ttl: int | None) -> HistoryLimits | None:
    size = limits.size if size is None else size
    ttl = limits.ttl if ttl is None else ttl
    return HistoryLimits(size, ttl, limits.max_bytes) if size > 0 and ttl > 0 else None


def _default(flag: bool | None) -> bool:
    return True if flag is None else flag
