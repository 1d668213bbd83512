"""Nodes the client avoids for a while after they failed it; each repeat doubles the ban (Petals-style)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

BASE_BAN_S = 15.0
MAX_BAN_S = 600.0


@dataclass
class BanList:
    base: float = BASE_BAN_S
    _until: dict[str, float] = field(default_factory=dict)
    _strikes: dict[str, int] = field(default_factory=dict)

    def ban(self, key: str) -> float:
        """Bans `key`; returns the ban's length in seconds."""
        strikes = self._strikes.get(key, 0)
        length = min(self.base * 2**strikes, MAX_BAN_S)
        self._strikes[key] = strikes + 1
        self._until[key] = time.monotonic() + length
        return length

    def banned(self) -> set[str]:
        now = time.monotonic()
        return {k for k, until in self._until.items() if until > now}
