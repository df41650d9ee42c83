"""Buffers between the connection's reader and the application: channel messages and pushes
(:class:`MessageStream`), and the chunks of one streamed call (:class:`Chunks`)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable
from typing import Any

from .errors import Overflow

#: Frames a :class:`MessageStream` holds unread before it ends with :exc:`Overflow` (each at most the server's
#: message size: 64 KiB by default).
MAX_UNREAD = 10_000
#: Chunks of one streamed call held unread; past it the connection's reader waits for the application, so the
#: server's outbound queue fills and the server pauses the stream's generator (end-to-end backpressure).
MAX_CHUNKS = 64

_END = object()


class MessageStream:
    """Frames as an async iterator: see ``messages()`` and ``pushes()``.

    Frames are buffered from the moment the stream is created, so create it
    before the publications you want to see. It ends when the client closes,
    and raises the client's fatal error (e.g. ``AuthenticationFailed``) if it
    stops for one, or :exc:`Overflow` if :data:`MAX_UNREAD` frames were left
    unread. Call :meth:`close` (or use ``async with``) to stop buffering a
    stream you no longer read; an unreferenced stream is dropped.
    """

    def __init__(self, channel: str | None, data_only: bool = False) -> None:
        self.channel = channel
        self._data_only = data_only  # pushes(): yield each frame's `data`
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._done = False

    def _put(self, item: Any) -> None:
        if self._done:
            return
        if self._queue.qsize() >= MAX_UNREAD:
            self._finish(Overflow(f"{MAX_UNREAD} frames left unread"))
            return
        self._queue.put_nowait(item)

    def _finish(self, item: Any = _END) -> None:
        if not self._done:
            self._queue.put_nowait(item)
        self._done = True

    def close(self) -> None:
        """Stop receiving; the iteration ends after what is already buffered."""
        self._finish()

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # stay ended
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            raise item
        return item.get("data") if self._data_only else item

    async def __aenter__(self) -> MessageStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class Chunks:
    """The frames of one streamed call, in order: ``chunk`` frames, then its terminal ``result``/``error`` frame
    or the exception that ended it (the connection lost)."""

    __slots__ = ("_items", "_end", "_readable", "_writable", "started")

    def __init__(self) -> None:
        self._items: deque[dict[str, Any]] = deque()  # at most MAX_CHUNKS (the reader waits beyond)
        self._end: dict[str, Any] | BaseException | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.started = False  # a chunk came: the server accepted the call

    def push(self, frame: dict[str, Any]) -> Awaitable[Any] | None:
        """A chunk; what the reader must await before reading on, when the buffer is full."""
        self.started = True
        self._items.append(frame)
        self._readable.set()
        if len(self._items) >= MAX_CHUNKS:
            self._writable.clear()
            return self._writable.wait()
        return None

    def finish(self, end: dict[str, Any] | BaseException) -> None:
        if self._end is None:
            self._end = end
        self._readable.set()
        self._writable.set()  # a reader waiting for room goes on: nobody will read these

    async def next(self) -> dict[str, Any] | BaseException:
        """The next chunk frame, else the end (a terminal frame or an exception), which stays."""
        while not self._items and self._end is None:
            self._readable.clear()
            await self._readable.wait()
        if self._items:
            frame = self._items.popleft()
            if len(self._items) < MAX_CHUNKS:
                self._writable.set()
            return frame
        assert self._end is not None
        return self._end
