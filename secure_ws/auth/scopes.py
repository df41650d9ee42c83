"""Rights from a token's ``scope`` claim: ``subscribe:<glob>`` and ``publish:<glob>`` for channels, and any
scope an application handler names (``orders:write``, granted by ``orders:write`` or ``orders:*``)."""

from __future__ import annotations

from ..wire.messages import MAX_CHANNEL_CHARS

# The longest scope a handler may require; a token's longer patterns are dropped like channel patterns are.
MAX_SCOPE_CHARS = MAX_CHANNEL_CHARS


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

    __slots__ = ("_scopes", "_subscribe", "_publish", "_any")

    def __init__(self, scopes: tuple[str, ...]) -> None:
        self._scopes = scopes
        self._subscribe = _globs(scopes, "subscribe:")
        self._publish = _globs(scopes, "publish:")
        self._any: tuple[Glob, ...] | None = None  # built on the first handler check: most connections never make one

    def allows(self, scope: str) -> bool:
        """Whether the token grants ``scope`` (a handler's ``scope=``), exactly or by a ``*`` pattern."""
        globs = self._any
        if globs is None:
            globs = self._any = _globs(self._scopes, "")
        return any(g.matches(scope) for g in globs)

    def may_subscribe(self, channel: str) -> bool:
        return any(g.matches(channel) for g in self._subscribe)

    def may_publish(self, channel: str) -> bool:
        return any(g.matches(channel) for g in self._publish)
