"""Channel history for one process (SPEC §11): bounded ring buffers with a TTL and a total memory bound.

Each published channel's record holds its epoch, its last offset and a ``deque(maxlen=size)`` of the exact texts
sent. Only a publication makes a record: reading a channel that has none creates nothing, and answers offset 0
with the epoch the channel's first publication will take (``_empty``: random per process, so a restart changes
every epoch, and drawn anew whenever a record is dropped, so that a generation of a channel lost between a read
and the next publication can never pass for the one the reader was told about). Bounds, all enforced on every
append:

* per channel: ``size`` messages, dropped ``ttl`` seconds after the channel's last publication; the record itself
  (epoch and offset, about 1 KiB) goes ``meta_ttl`` after it;
* in total: ``max_bytes``, counting what each text takes in memory (``sys.getsizeof``: a header and 1, 2 or 4
  bytes a character, so 16,000 emoji count 64 KB, not 16,000) plus ``ENTRY_COST``, and ``RECORD_COST`` plus the
  name per channel (measured with tracemalloc, ``test_history.py``). Over it, whole channels are evicted, idle
  ones first, then the least recently published (their epoch is lost: a later subscriber gets a new one); a
  channel that alone exceeds it loses its oldest messages instead.

Records are kept in two ``OrderedDict`` ordered by last publication (``_live`` with messages, ``_idle`` without),
so expiry and eviction look only at the oldest end: O(1) amortised per append.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from itertools import islice
from sys import getsizeof

from .storage import History, HistoryLimits, Position

ENTRY_COST = 16  # a held text's deque slot (blocks of 64 slots, allocated as the deque fills), beyond getsizeof
RECORD_COST = 1024  # a channel's record, epoch, empty deque (one 64-slot block) and ordered-dict entry, beside its name


def new_epoch() -> str:
    return secrets.token_hex(8)


def record_cost(channel: str) -> int:
    return RECORD_COST + getsizeof(channel)


class _Record:
    __slots__ = ("epoch", "offset", "texts", "touched", "ttl", "meta_ttl")

    def __init__(self, epoch: str, limits: HistoryLimits, now: float) -> None:
        self.epoch = epoch
        self.offset = 0
        self.texts: deque[str] = deque(maxlen=limits.size)
        self.touched = now
        self.ttl = limits.ttl  # the channel's own (its channel options'), kept with it
        self.meta_ttl = limits.meta_ttl


class MemoryHistory:
    def __init__(self, limits: HistoryLimits) -> None:
        self.limits = limits
        self._live: OrderedDict[str, _Record] = OrderedDict()  # records holding messages, oldest publication first
        self._idle: OrderedDict[str, _Record] = OrderedDict()  # records whose messages expired (or none yet)
        self.bytes = 0
        self._empty = new_epoch()  # the epoch a channel without a record is at, and its next record takes

    def append(self, channel: str, head: str, limits: HistoryLimits | None = None) -> tuple[str, Position]:
        """The message's final text and where it went; ``limits``: the channel's (else those given at construction)."""
        now = time.monotonic()
        self._expire(now)
        record = self._live.pop(channel, None) or self._idle.pop(channel, None)
        if record is not None and record.touched + record.ttl <= now:
            self._drop_texts(record)  # expired behind a channel with a longer TTL (see _expire)
        if record is None:
            record = _Record(self._empty, limits or self.limits, now)
            self.bytes += record_cost(channel)
        self._live[channel] = record
        record.touched = now
        record.offset += 1
        text = f'{head},"offset":{record.offset},"epoch":"{record.epoch}"}}'
        texts = record.texts
        if len(texts) == texts.maxlen:
            self.bytes -= getsizeof(texts[0]) + ENTRY_COST
        texts.append(text)
        self.bytes += getsizeof(text) + ENTRY_COST
        if self.bytes > self.limits.max_bytes:
            self._evict(channel)
        return text, Position(record.offset, record.epoch)

    def read(self, channel: str, since: Position | None, limit: int) -> History:
        now = time.monotonic()
        self._expire(now)
        record = self._live.get(channel) or self._idle.get(channel)
        if record is not None and record.texts and record.touched + record.ttl <= now:
            self._drop_texts(record)  # expired behind a channel with a longer TTL (see _expire)
        if record is None:  # never published, or forgotten: nothing to create, nothing held
            empty = self._empty
            return History(0, empty, [], since is None or (since.offset == 0 and since.epoch == empty))
        texts = record.texts
        held = len(texts)
        if since is None:
            return History(record.offset, record.epoch, list(islice(texts, max(0, held - limit), held)), True)
        if since.epoch != record.epoch or not record.offset - held <= since.offset <= record.offset:
            return History(record.offset, record.epoch, [], False)
        start = held - (record.offset - since.offset)  # index of offset since + 1
        return History(record.offset, record.epoch, list(islice(texts, start, start + limit)), True)

    def _expire(self, now: float) -> None:
        # Channels may have different TTLs: this stops at the oldest publication not yet expired, so a channel
        # behind it with a shorter TTL expires late here, and is checked on its own read or append instead.
        live, idle = self._live, self._idle
        while live:
            channel, record = next(iter(live.items()))
            if record.touched + record.ttl > now:
                break
            del live[channel]
            self._drop_texts(record)
            idle[channel] = record  # still in order of last publication
        while idle:
            channel, record = next(iter(idle.items()))
            if record.touched + record.meta_ttl > now:
                break
            del idle[channel]
            self.bytes -= record_cost(channel)
            self._empty = new_epoch()

    def _evict(self, keep: str) -> None:
        """Back under ``max_bytes``: whole channels other than ``keep`` (which was just put at the newest end), idle
        ones first, then the least recently published; then ``keep``'s oldest messages."""
        for records in (self._idle, self._live):
            while self.bytes > self.limits.max_bytes and records:
                channel = next(iter(records))
                if channel == keep:  # the only one left here
                    break
                self._drop_texts(records.pop(channel))
                self.bytes -= record_cost(channel)
                self._empty = new_epoch()
        record = self._live.get(keep)
        if record is not None:
            texts = record.texts
            while self.bytes > self.limits.max_bytes and len(texts) > 1:
                self.bytes -= getsizeof(texts.popleft()) + ENTRY_COST

    def _drop_texts(self, record: _Record) -> None:
        self.bytes -= sum(map(getsizeof, record.texts)) + ENTRY_COST * len(record.texts)
        record.texts.clear()
