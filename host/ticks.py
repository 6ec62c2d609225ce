"""Tick sanity: one bad print never moves the PnL, the trailing limit or a strategy."""
from __future__ import annotations

from decimal import Decimal
from typing import Callable, Optional

from .models import Tick


class TickSanity:
    """A tick more than `jump_pct` from the last one of its symbol is held until a second tick confirms it."""

    def __init__(self, jump_pct: Decimal, last_price: Callable[[str, str], Optional[Decimal]] = lambda e, s: None):
        self.jump_pct = jump_pct
        self.last_price = last_price  # the last stored price, for a symbol not seen since the start
        self._last: dict[tuple[str, str], Decimal] = {}
        self._held: dict[tuple[str, str], Decimal] = {}
        self.held_count = 0

    def _near(self, price: Decimal, ref: Optional[Decimal]) -> bool:
        return ref is None or ref <= 0 or abs(price - ref) * 100 <= self.jump_pct * ref

    def admit(self, ticks: list[Tick]) -> list[Tick]:
        """The ticks that may be used; the others are held (and counted)."""
        if self.jump_pct <= 0:
            return ticks
        out = []
        for t in ticks:
            key = (t.exchange, t.symbol)
            if key not in self._last:
                last = self.last_price(*key)
                if last is not None:
                    self._last[key] = last
            held = self._held.get(key)
            if not self._near(t.ltp, self._last.get(key)) and not (held is not None and self._near(t.ltp, held)):
                self._held[key] = t.ltp  # wait for a second tick near this one
                self.held_count += 1
                continue
            self._held.pop(key, None)
            self._last[key] = t.ltp
            out.append(t)
        return out
