"""The context a strategy sees: its own positions, orders, ticks, params, state and logger. Nothing else."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Mapping, Optional

from .models import Holding, Order, Tick


@dataclass
class StrategyContext:
    """Read-only toward the host: the host refreshes it before each call; only `state` is the plugin's."""

    name: str
    version: str
    generation: int
    params: Mapping
    state: dict
    logger: logging.Logger
    symbols: tuple[str, ...] = ()
    positions: tuple[Holding, ...] = ()
    open_orders: tuple[Order, ...] = ()
    ticks: Mapping[str, Tick] = field(default_factory=lambda: MappingProxyType({}))

    def position(self, exchange: str, symbol: str) -> int:
        """The strategy's net quantity in a symbol (all products; short is negative)."""
        return sum(h.net_qty for h in self.positions if (h.exchange, h.symbol) == (exchange, symbol))

    def ltp(self, exchange: str, symbol: str) -> Optional[Decimal]:
        tick = self.ticks.get(f"{exchange}:{symbol}")
        return tick.ltp if tick else None
