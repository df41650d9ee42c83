"""An asyncio client for secure_ws: authenticate, stay connected, talk JSON.

:class:`Client` opens a ``wss://`` connection with ``Authorization: Bearer <jwt>``
and keeps it alive for as long as you use it:

* it asks your **token provider** for a token on every connection attempt, so a
  reconnect never reuses a token that has expired in the meantime;
* it **refreshes in band** before the token expires (``{"type": "refresh"}``),
  so a long-lived connection is not cut at the token's ``exp``;
* it **reconnects** after a drop, a server restart or a recoverable refusal
  (``token expired``, ``too many connections``, ``rate limit exceeded``,
  ``slow consumer``, 1001/1011/1012/1013/1006…), waiting a jittered, bounded,
  exponentially growing delay between attempts;
* it **re-subscribes** every channel you subscribed once a new connection is up, **recovering** what
  was published meanwhile: it keeps the last ``offset`` and ``epoch`` it saw on each channel and
  re-subscribes with ``since``, so the server replays the missed messages before the live ones;
  when that cannot be done (history lost, or the client was away too long) it calls
  ``on_recovery_failed(channel)`` so that the application reloads its state;
* it delivers **pushes** (``pushes()`` or ``on_push=``), **join/leave** events (``subscribe(channel,
  join_leave=True)``), answers **calls** (``await call(type, data)``) and **streams** (``async for data in
  stream(type, data)``; leaving the loop early cancels the call on the server), reads **history** and
  **presence**, and **resumes** a channel from a saved position (``subscribe(channel, since=position)``);
* it **stops** with :exc:`AuthenticationFailed` when the server refuses
  credentials that a fresh token cannot fix (``invalid token``, ``token revoked``,
  ``origin not allowed``, ``ambiguous credentials``, ``missing token``).

Typical use::

    import asyncio, ssl
    from secure_ws.client import Client

    async def main() -> None:
        tls = ssl.create_default_context(cafile="certs/ca.crt")    # dev CA; omit for a public CA
        async with Client("wss://localhost:8000/ws", get_token, ssl=tls) as client:
            print(await client.echo({"hello": "world"}))            # {'hello': 'world'}
            await client.subscribe("room.lobby")
            await client.publish("room.lobby", {"text": "hi"})
            async for message in client.messages("room.lobby"):
                print(message["from"], message["data"])

``get_token`` is any callable returning a JWT, plain or ``async`` — a call to
your identity provider, a read of a file that a sidecar keeps fresh… It is
called again for every connection and every refresh, and the token is never
logged.

Garbage from a server is never a hang: a frame that is not a JSON object, of an unknown type or with an ``id``
no request has is logged and ignored; a first frame that is not a ``welcome`` counts as a failed attempt (retried
with backoff); a close with a code or reason the client does not know is retried with backoff like a drop, except
the fatal 1008 reasons above.

Requests and replies are matched by ``id``: :meth:`Client.request` adds one
when the message has none and returns the reply that echoes it, or raises
:exc:`RequestError` for the ``error`` frame that does. A request that is in
flight when the connection drops raises :exc:`ConnectionLost`; it is not resent
(a ``publish`` may or may not have happened), except ``subscribe`` and
``unsubscribe``, which are idempotent and are retried on the next connection.
"""

from __future__ import annotations

from .backoff import backoff_delay
from .client import Client, TokenProvider
from .errors import (
    FATAL_REASONS,
    AuthenticationFailed,
    ClientClosed,
    ClientError,
    ConnectionLost,
    ConnectionRefused,
    HandshakeRejected,
    Overflow,
    ProtocolViolation,
    RateLimited,
    RequestError,
)
from .inbox import MessageStream
from .protocol import Link, Protocol

__all__ = [
    "Client",
    "ClientError",
    "AuthenticationFailed",
    "ConnectionRefused",
    "HandshakeRejected",
    "ConnectionLost",
    "ClientClosed",
    "RequestError",
    "RateLimited",
    "Overflow",
    "ProtocolViolation",
    "MessageStream",
    "Protocol",
    "Link",
    "TokenProvider",
    "backoff_delay",
    "FATAL_REASONS",
]
