"""What backends and operators do to the live service, over any storage: publish, push, disconnect, revoke.

One code path for each, whoever asks: :class:`secure_ws.SecureWS` and the service
(``api.publish`` …), the server API (``POST /api/…``), :class:`secure_ws.Publisher`
(another process sharing the Redis) and the ``secure-ws`` commands.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from .. import metrics
from ..auth.revocation import Revocations, sub_cutoff
from ..settings import Settings
from ..wire.messages import encode, message_head
from .storage import DISCONNECT, SEND, Storage


def check_sub(sub: Any) -> str:
    if type(sub) is not str or not sub:
        raise ValueError("sub must be a non-empty string")
    return sub


async def publish(storage: Storage, channel: str, data: Any, sender: str | None = None) -> dict[str, Any]:
    """The one way a publication goes out (the built-in ``publish``, ``Context.publish``, ``SecureWS.publish``,
    the server API, :class:`secure_ws.Publisher`, ``secure-ws publish``): ``{"type":"message","channel":C,
    "from":sender,"data":data}`` (no ``from`` without a sender) to every subscriber on every worker, and into
    the channel's history. Returns ``{"offset": N, "epoch": E}``, or ``{}`` with history off. ``ValueError``
    for a bad channel, ``TypeError`` for data that is not JSON, ``StorageUnavailable`` when storage does not
    answer (then nothing was published)."""
    position = await storage.publish(channel, message_head(channel, data, sender))  # encoded once, here
    metrics.STATS.publishes += 1
    return {} if position is None else {"offset": position.offset, "epoch": position.epoch}


async def send(storage: Storage, sub: str, data: Any) -> None:
    """``{"type":"push","data":X}`` to every connection of ``sub``, on every worker and host."""
    await storage.signal(SEND, check_sub(sub), encode({"type": "push", "data": data}))


async def disconnect(storage: Storage, sub: str) -> None:
    """Close every connection of ``sub`` with 1008 ``disconnected``, on every worker and host."""
    await storage.signal(DISCONNECT, check_sub(sub))


async def revoke(storage: Storage, settings: Settings, jti: str | None = None, sub: str | None = None) -> dict[str, Any]:
    """``secure-ws token revoke``: one token (``jti``) or every token of ``sub`` issued until now. Returns what
    was revoked, ``{"revoked": {"jti": J} | {"sub": S, "issued_until": T}, "until": T}`` (kept until then).

    Durable first (the revocation file), then every worker. A ``sub`` revocation returns only once the
    current second is over: tokens carry whole-second ``iat``s, so one issued later within this second
    would be covered too; every token issued after this returns is unaffected.
    """
    if (jti is None) == (sub is None):
        raise ValueError("revoke exactly one of jti or sub")
    now = time.time()
    until = now + settings.max_token_ttl + settings.leeway  # kept until every token it covers has expired anyway
    if jti is not None:
        if type(jti) is not str or not jti:
            raise ValueError("jti must be a non-empty string")

        def change(r: Revocations) -> Revocations:
            return r.with_jti(jti, until)
    else:
        revoked, cutoff = check_sub(sub), sub_cutoff(now)

        def change(r: Revocations) -> Revocations:
            return r.with_sub(revoked, cutoff, until)

    await storage.update_revocations(change)
    if sub is None:
        return {"revoked": {"jti": jti}, "until": until}
    await asyncio.sleep(max(0.0, math.floor(cutoff) + 1 - time.time()))
    return {"revoked": {"sub": revoked, "issued_until": cutoff}, "until": until}
