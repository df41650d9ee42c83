"""Revocations: which tokens stop working before their ``exp``.

Two kinds, both checked at the handshake, on refresh, and against live
connections whenever the list changes:

* by ``jti`` — one token;
* by ``sub`` — every token of that subject issued (``iat``) at or before a cut-off.

An entry is kept only as long as a token it covers could still be valid, so the
list stays small without any manual clean-up. Entries are only ever added or
made stronger (:meth:`Revocations.merged`) until they expire: no source going
empty (a Redis restart, a deleted file) can take one back. Where the list lives
is the storage's business (:mod:`secure_ws.storage`); this module is the pure data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .tokens import Principal


@dataclass(frozen=True)
class Revocations:
    jtis: dict[str, float] = field(default_factory=dict)  # jti → keep until (epoch s)
    subs: dict[str, tuple[float, float]] = field(default_factory=dict)  # sub → (issued at or before, keep until)

    def covers(self, principal: Principal) -> bool:
        if principal.jti is not None and principal.jti in self.jtis:
            return True
        cut = self.subs.get(principal.sub)
        return cut is not None and principal.iat <= cut[0]

    def __bool__(self) -> bool:
        return bool(self.jtis or self.subs)

    def pruned(self, now: float | None = None) -> Revocations:
        now = time.time() if now is None else now
        return Revocations(
            {j: u for j, u in self.jtis.items() if u > now},
            {s: c for s, c in self.subs.items() if c[1] > now},
        )

    def merged(self, other: Revocations) -> Revocations:
        """Both lists in one, each entry at its strongest: what either source knows stays revoked."""
        jtis = dict(self.jtis)
        for jti, until in other.jtis.items():
            jtis[jti] = max(until, jtis.get(jti, 0.0))
        subs = dict(self.subs)
        for sub, (before, until) in other.subs.items():
            old = subs.get(sub, (0.0, 0.0))
            subs[sub] = (max(before, old[0]), max(until, old[1]))
        return Revocations(jtis, subs)

    def with_jti(self, jti: str, until: float) -> Revocations:
        return self.merged(Revocations({jti: until}))

    def with_sub(self, sub: str, issued_before: float, until: float) -> Revocations:
        return self.merged(Revocations({}, {sub: (issued_before, until)}))

    def to_json(self) -> dict[str, Any]:
        return {"jti": self.jtis, "sub": {s: list(c) for s, c in self.subs.items()}}

    @classmethod
    def from_json(cls, document: Any) -> Revocations:
        if not isinstance(document, dict):
            raise ValueError("revocations: expected an object")
        jtis = {str(j): float(u) for j, u in document.get("jti", {}).items()}
        subs = {str(s): (float(c[0]), float(c[1])) for s, c in document.get("sub", {}).items()}
        return cls(jtis, subs)


def sub_cutoff(now: float | None = None) -> float:
    """The ``iat`` at or below which a ``--sub`` revocation applies: the moment of the revocation itself.

    Not rounded down: another issuer's ``iat`` may carry a fraction, and a token
    issued a few ms before the revocation (``iat`` = N.3 when the revocation runs
    at N.7) must be covered. Our own tokens carry whole seconds, so one issued
    later within that second (``iat`` = N) is covered too; the ops command waits
    for the next second before it returns, so any token issued after it is valid.
    """
    return time.time() if now is None else now
