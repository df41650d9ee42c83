"""Close codes (RFC 6455 §7.4.1) and the fixed close reasons the server sends (SPEC §3, §4).

A reason is part of the contract: clients (ours in :mod:`secure_ws.client` too)
decide from it whether to reconnect, refresh or give up, so each is written once, here.
"""

from __future__ import annotations

from enum import IntEnum


class Close(IntEnum):
    GOING_AWAY = 1001  # shutdown
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003  # a binary frame
    INVALID_DATA = 1007  # invalid UTF-8
    POLICY_VIOLATION = 1008  # every refusal of SPEC §3 and the abuse closes of §4
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013  # shared storage unreachable


# 1008 reasons at the handshake (SPEC §3)
MISSING = "missing token"
INVALID = "invalid token"
EXPIRED = "token expired"
REVOKED = "token revoked"
ORIGIN_NOT_ALLOWED = "origin not allowed"
AMBIGUOUS = "ambiguous credentials"
TOO_MANY = "too many connections"
CONNECTION_REFUSED = "connection refused"  # an application's on_connect hook refused it (SPEC §9)
DISCONNECTED = "disconnected"  # the application or the server API disconnected the sub (SPEC §9, §10)
# 1013: storage unreachable, so revocations and connection caps cannot be checked
SERVICE_UNAVAILABLE = "service unavailable"

# on a live connection (SPEC §4)
RATE_LIMIT_EXCEEDED = "rate limit exceeded"
SLOW_CONSUMER = "slow consumer"
MESSAGE_TOO_BIG = "message too big"
BINARY_REFUSED = "binary frames are not accepted"
INTERNAL_ERROR = "internal error"
SHUTTING_DOWN = "server shutting down"
