"""secure_ws's WebSocket protocol for uvicorn: websockets-sansio's handshake, a lean open connection.

uvicorn's ``websockets-sansio`` protocol spends more per frame than our whole
application does: every message goes through an ``asyncio.Queue``, pauses and
resumes the socket's reading, waits on an ``asyncio.Event`` before each send,
and is parsed by ``websockets``' generator-based reader. This subclass keeps
everything that happens rarely (the opening handshake and its 4xx answers, the
``websocket.http.response`` extension, keepalive pings, closing, shutdown) and
replaces what happens on every frame:

* frames are parsed by :mod:`secure_ws.wire.framing`;
* a message goes straight to the application's pending ``receive()``; only when
  the application is busy is it queued, and only then is reading paused, so
  memory stays as bounded as before;
* a publication's frame, built once for all of its subscribers, is written as
  is; those that follow it in the same loop turn are written together at the
  turn's end (:meth:`WebSocketProtocol.write_frame`): a burst of publications
  costs each subscriber two TLS records and writes per turn, not one per publication;
* ``websocket.send`` frames the text and writes it, and waits only while the
  transport has paused writing; a message over ``PIECE`` bytes goes out as
  fragments of ``PIECE`` bytes, each written once the transport takes more, so
  that the write buffer never holds a whole large message beside what the
  application counts (:meth:`WebSocketProtocol.buffered`);
* an application may go further through the ``secure_ws.direct`` scope
  extension (this protocol object): :meth:`WebSocketProtocol.attach` a frame
  handler, called with each text message straight from the socket's read while
  the application is idle in ``receive()``, and get back a writer that sends
  text without an ASGI message. :mod:`secure_ws.session` does; it is how a
  frame is answered with no task switch at all.

Bounds, since a client controls every byte: a message is at most the application's
limit (given to :meth:`WebSocketProtocol.attach`), decided from the frame header;
the application's backlog is one socket read at most (reading pauses as soon as
a message has to wait); a read's pings are each answered up to ``PONGS_PER_READ``,
beyond that only the last one (RFC 6455 §5.5.3 allows it), so a ping flood costs
one pong per read; none while the transport has paused writing and none after
our close frame; bytes before our 101 are kept up to ``EARLY_DATA_LIMIT``.

permessage-deflate is never negotiated: our messages are small JSON objects
that compress poorly, compression would cost CPU on every frame and tens of KiB
of zlib state per connection, and compressing a client's token (in ``refresh``)
together with data others choose is the CRIME/BREACH side channel.

``secure-ws serve`` names this class as its ``ws`` protocol. Plain
``uvicorn secure_ws.main:app`` imports its default protocol class before it
imports our app, so :func:`secure_ws.uvicorn.install.install` (called by :mod:`secure_ws.main`)
makes that class build this one instead; ``--ws websockets`` or ``--ws wsproto``
are left alone. Both only on a uvicorn version it was tested with (:func:`supported`).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode

from ..core.handshake import PEER
from ..core.session import DIRECT, WORK
from ..wire.framing import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    Parser,
    Violation,
    close_frame,
    fragments,
    frame,
    parse_close,
)

log = logging.getLogger("secure_ws")

# The subclass leans on uvicorn's internals (its attribute names, which method writes what), so it is
# only installed on the uvicorn minor versions the test suite ran on; elsewhere uvicorn's own runs.
TESTED_UVICORN = [["0", "54"]]


# What a client may send after its upgrade request and before our 101 (it should send nothing, RFC 6455 §4.1).
EARLY_DATA_LIMIT = 65536

# The largest write of one message: a longer one goes out as fragments of this many bytes, one per time the
# transport takes more; a text of more characters is not written directly (write_text) but queued.
PIECE = 65536
FRAME_LIMIT = PIECE + 10  # a frame of PIECE payload bytes and its longest header (write_frame)

# Per event loop, the connections whose publications of this loop turn wait to be written together (_flush_turn).
# Bound: this loop's connections, each once per turn plus once per reply or control frame that wrote its batch early.
_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[WebSocketProtocol]] = weakref.WeakKeyDictionary()

# Pings of one read answered one by one (Autobahn case 2.10 sends ten at once); beyond, only the read's last.
PONGS_PER_READ = 16


class Inbox:
    """The application's receive queue: a message goes straight to a waiting ``receive()``."""

    __slots__ = ("backlog", "waiter")

    def __init__(self) -> None:
        self.backlog: deque[dict[str, Any]] = deque()
        self.waiter: asyncio.Future[dict[str, Any]] | None = None

    def put_nowait(self, message: dict[str, Any]) -> bool:
        """True when ``message`` had to wait in the backlog (the application was busy)."""
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():  # not cancelled with its task
                waiter.set_result(message)
                return False
        self.backlog.append(message)
        return True


class WebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue: Inbox = Inbox()  # type: ignore[assignment]
        self.conn.available_extensions = []
        self._parser: Parser | None = None  # set once the 101 is sent
        self._early = b""
        self._on_text: Callable[[str], Any] | None = None
        self._max_size: int = self.config.ws_max_size
        self._app_closed = False  # the application sent websocket.close
        # Frames of write_frame waiting for the end of this loop turn. Bound: FRAME_LIMIT bytes and one frame more
        # (a longer batch is written at once); counted in buffered(), written before anything else we write.
        self._batch: list[bytes] | None = None
        self._batched = 0
        turn = _TURNS.get(self.loop)
        if turn is None:
            turn = _TURNS[self.loop] = []
        self._turn = turn  # this loop's, looked up once per connection rather than once per frame

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if self.handshake_initiated and not self.handshake_complete:  # the application is about to run
            extensions: dict[str, Any] = self.scope["extensions"]
            extensions[DIRECT] = self
            extensions[PEER] = self.client

    def attach(self, on_text: Callable[[str], Any] | None, max_size: int | None = None) -> Callable[[str], bool]:
        """Have ``on_text(text)`` handle text messages while the application waits in ``receive()``;
        what it returns, unless None, reaches ``receive()`` as ``{"type": "websocket.receive", WORK: …}``.
        ``max_size``, if given, is the largest message the application takes: larger ones are refused
        with 1009 from the frame header, whatever uvicorn's ``ws_max_size``. Returns :meth:`write_text`."""
        self._on_text = on_text
        if max_size is not None:
            self._max_size = min(max_size, self._max_size)
            if self._parser is not None:
                self._parser.max_size = self._max_size
        return self.write_text

    def write_text(self, text: str) -> bool:
        """Send a text message now; False (nothing sent) while the transport has paused writing, or for a text
        over ``PIECE`` characters (one that goes out in pieces, through ``websocket.send``)."""
        if len(text) > PIECE or not self.writable.is_set():
            return False
        if not (self.close_sent or self.transport.is_closing()):
            if self._batch is not None:
                self._flush()
            self.transport.write(frame(TEXT, text.encode()))
        return True

    def write_frame(self, data: bytes, later: bool = False) -> bool:
        """Send a whole frame built by the caller: a publication's, built once for all of its subscribers. With
        ``later`` (the publication is not the first of this loop turn) it is written at the end of the turn
        together with the turn's others, so that a burst costs each subscriber one write more, not one per
        publication. False (nothing sent) as :meth:`write_text`, and for a frame of more than ``PIECE`` payload bytes."""
        if len(data) > FRAME_LIMIT or not self.writable.is_set():
            return False
        if self.close_sent or self.transport.is_closing():
            return True
        batch = self._batch
        if batch is None:
            if not later:
                self.transport.write(data)
                return True
            self._batch = [data]
            self._batched = len(data)
            turn = self._turn
            if not turn:
                self.loop.call_soon(_flush_turn, turn)
            turn.append(self)
            return True
        if self._batched + len(data) > FRAME_LIMIT:
            self._flush()  # the batch is written now; the transport may then pause writing
            if not self.writable.is_set():
                return False
            self._batch = batch = []
            self._batched = 0
        batch.append(data)
        self._batched += len(data)
        return True

    def _flush(self) -> None:
        """Write the frames of :meth:`write_frame` waiting for the end of the turn (before anything else is written,
        so that this connection's order is kept)."""
        batch, self._batch = self._batch, None
        self._batched = 0
        if batch and not self.transport.is_closing():
            self.transport.write(batch[0] if len(batch) == 1 else b"".join(batch))

    def buffered(self) -> int:
        """Bytes in the transport's write buffer (for TLS, those not yet handed to the socket's own buffer, which
        holds at most its high-water mark plus one piece more)."""
        return self.transport.get_write_buffer_size() + self._batched

    # -- input ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            self._handshake_data(data)
            return
        pings: list[bytes] | None = None  # bound: PONGS_PER_READ + 1 payloads of at most 125 bytes
        for opcode, payload in parser.feed(data):
            if opcode == TEXT:
                handler = self._on_text
                if handler is not None and self.queue.waiter is not None and not self.close_sent:
                    work = handler(payload)  # type: ignore[arg-type]  # a TEXT event carries str
                    if work is not None:
                        self._deliver({"type": "websocket.receive", WORK: work})
                else:
                    self._deliver({"type": "websocket.receive", "text": payload})
            elif opcode == BINARY:
                self._deliver({"type": "websocket.receive", "bytes": payload})
            elif opcode == PING:
                if pings is None:
                    pings = []
                elif len(pings) > PONGS_PER_READ:
                    pings.pop()  # beyond the first PONGS_PER_READ, only the last ping of the read is answered
                pings.append(payload)  # type: ignore[arg-type]
            elif opcode == PONG:
                self.handle_pong(Frame(Opcode.PONG, payload))  # type: ignore[arg-type]
            else:
                self._close_received(payload)  # type: ignore[arg-type]
                return
        if pings is not None:
            self._pong(pings)
        if parser.error is not None:
            self._fail(parser.error)

    def _pong(self, pings: list[bytes]) -> None:
        # At most PONGS_PER_READ + 1 pongs per read, and none while the transport has paused writing or
        # after our close frame: a client that sends pings and never reads must not grow our write buffer.
        if self.writable.is_set() and not self.close_sent and not self.transport.is_closing():
            if self._batch is not None:
                self._flush()
            self.transport.write(b"".join([frame(PONG, payload) for payload in pings]))

    def _handshake_data(self, data: bytes) -> None:
        if not self.handshake_initiated:
            super().data_received(data)
            if self.conn.handshake_exc is not None and not self.handshake_initiated and not self.transport.is_closing():
                # websockets refused the request itself (a header over 8 KiB → 431, a request line too
                # long → 414) and queued its answer, which uvicorn 0.54 never writes: the client would hang.
                self.transport.write(b"".join(self.conn.data_to_send()))
                self.close_sent = True
                self.transport.close()
        elif not self.handshake_complete:
            # Frames sent before our 101: kept (up to a limit) for the parser the 101 starts.
            self._early += data
            if len(self._early) > EARLY_DATA_LIMIT:
                self.transport.close()

    def _deliver(self, message: dict[str, Any]) -> None:
        if self.close_sent:
            return  # the application is past `websocket.close`; keep reading for the peer's close reply
        if self.queue.put_nowait(message) and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _close_received(self, payload: bytes) -> None:
        if self.close_sent:
            self.handle_close(None)  # type: ignore[arg-type]  # the reply to our close: uvicorn's handler ends it
            return
        try:
            code, reason = parse_close(payload)
        except Violation as exc:
            self._fail(exc)
            return
        if not self.transport.is_closing():
            if self._batch is not None:
                self._flush()
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
            self.transport.write(frame(CLOSE, payload[:2]))  # echo the code, as RFC 6455 §5.5.1 suggests
            self.transport.close()

    def _fail(self, violation: Violation) -> None:
        if self.close_sent:
            self.transport.close()
            return
        if not self.transport.is_closing():
            if self._batch is not None:
                self._flush()
            self.queue.put_nowait({"type": "websocket.disconnect", "code": violation.code, "reason": violation.reason})
            self.transport.write(close_frame(violation.code, violation.reason))
            self.close_sent = True
            self.transport.close()

    async def receive(self) -> Any:
        inbox = self.queue
        backlog = inbox.backlog
        if backlog:
            message = backlog.popleft()
            if self.read_paused and not backlog:
                self.read_paused = False
                self.transport.resume_reading()
            return message
        inbox.waiter = waiter = self.loop.create_future()
        return await waiter

    # -- output --------------------------------------------------------------------

    def shutdown(self) -> None:
        if self._batch is not None:
            self._flush()  # before the server's close frame
        super().shutdown()

    async def send(self, message: Any) -> None:
        if self._batch is not None:
            self._flush()  # what was written before goes first
        kind = message["type"]
        if self._parser is not None and kind in ("websocket.send", "websocket.close"):
            if self.close_sent and not self._app_closed:
                # We failed the connection (a protocol violation) while the application still held a
                # message: ASGI asks for an OSError here (uvicorn's ClientDisconnected), not a RuntimeError.
                if kind == "websocket.send":
                    raise ClientDisconnected()
                return
            if kind == "websocket.close":
                self._app_closed = True
            elif not self.close_sent:
                if not self.writable.is_set():
                    await self.writable.wait()
                if self.disconnected or self.transport.is_closing():
                    raise ClientDisconnected()
                text = message.get("text")
                opcode, data = (TEXT, text.encode()) if text is not None else (BINARY, message.get("bytes") or b"")
                if len(data) <= PIECE:
                    self.transport.write(frame(opcode, data))
                    return
                for piece in fragments(opcode, data, PIECE):
                    if not self.writable.is_set():
                        await self.writable.wait()
                    if self.close_sent or self.disconnected or self.transport.is_closing():
                        raise ClientDisconnected()
                    self.transport.write(piece)
                return
        await super().send(message)
        if self._parser is None and self.handshake_complete and not self.close_sent and self.initial_response is None:
            self._parser = Parser(self._max_size)
            if self._early:
                early, self._early = self._early, b""
                self.data_received(early)


def _flush_turn(turn: list[WebSocketProtocol]) -> None:
    """At the end of a loop turn: each connection's publications of the turn, as one write."""
    protocols = turn[:]
    turn.clear()
    for protocol in protocols:
        protocol._flush()


def supported(version: str = uvicorn.__version__) -> bool:
    """Whether this uvicorn is one whose ``websockets-sansio`` internals this subclass was tested on."""
    return version.split(".")[:2] in TESTED_UVICORN
