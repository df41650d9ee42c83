"""Close codes (RFC 6455 §7.4.1) and the fixed close reasons the server sends.

A reason is part of the contract: clients (ours in :mod:`secure_ws.client` too)
decide from it whether to reconnect, refresh or give up, so each is written once, here.
"""

from __future__ import annotations

from enum import IntEnum


class Close(IntEnum):
    GOING_AWAY = 1001  # shutdown
    PROTOCOL_ERROR = 1002  # a frame that breaks RFC 6455
    UNSUPPORTED_DATA = 1003  # a binary frame
    INVALID_DATA = 1007  # invalid UTF-8
    POLICY_VIOLATION = 1008  # every handshake refusal, and the abuse closes on a live connection
    MESSAGE_TOO_BIG = 1009  # larger than SECURE_WS_MAX_MESSAGE_BYTES
    INTERNAL_ERROR = 1011  # a server fault (logged on the server, nothing sent)
    SERVICE_RESTART = 1012  # restarting: reconnect with backoff
    TRY_AGAIN_LATER = 1013  # shared storage unreachable


# 1008 reasons at the handshake
MISSING = "missing token"  # no token in any transport
INVALID = "invalid token"  # bad signature, claims, algorithm or key: fix the credentials
EXPIRED = "token expired"  # get a fresh token and reconnect (or send refresh before expires_at)
REVOKED = "token revoked"  # the token, its subject or its signing key was revoked
ORIGIN_NOT_ALLOWED = "origin not allowed"  # not in SECURE_WS_ALLOWED_ORIGINS
AMBIGUOUS = "ambiguous credentials"  # two different tokens in one handshake
TOO_MANY = "too many connections"  # the sub holds SECURE_WS_MAX_CONNECTIONS_PER_CLIENT already
CONNECTION_REFUSED = "connection refused"  # an application's on_connect hook refused it
DISCONNECTED = "disconnected"  # the application or the server API disconnected the sub
# 1013: storage unreachable, so revocations and connection caps cannot be checked
SERVICE_UNAVAILABLE = "service unavailable"  # 1013: shared storage unreachable; retry later

# on a live connection
RATE_LIMIT_EXCEEDED = "rate limit exceeded"  # SECURE_WS_RATE_LIMIT_CLOSE_AFTER frames in a row over the limit
SLOW_CONSUMER = "slow consumer"  # the client left more than SECURE_WS_SEND_QUEUE_BYTES unread
MESSAGE_TOO_BIG = "message too big"  # 1009
BINARY_REFUSED = "binary frames are not accepted"  # 1003
INTERNAL_ERROR = "internal error"  # 1011
SHUTTING_DOWN = "server shutting down"  # 1001: reconnect with backoff
