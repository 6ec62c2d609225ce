"""The context a strategy sees: its own positions, orders, ticks, params, state and logger. Nothing else."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Mapping, Optional

from .models import Holding, Intent, Order, Protection, Tick


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

    @staticmethod
    def protect(intent: Intent, **exits: Any) -> Intent:
        """The intent with exits that travel with it, named as on a webhook leg: stop_loss, target (absolute),
        stop_loss_points, target_points, stop_loss_pct, target_pct, trailing_type ("POINTS" | "PERCENT"),
        trailing_value, trailing_activation_price; and the strategy's MTM limits strategy_stoploss,
        strategy_target, strategy_trailing_step (rupees). Numbers may be Decimal, int or str (never float: a
        float is refused). The host checks them like an alert's and keeps the stop resting at the broker."""
        values = {}
        for name, value in exits.items():
            if value is None:
                continue
            if name not in Protection.__dataclass_fields__:
                raise TypeError(f"ctx.protect: unknown exit field {name!r}")
            if name == "trailing_type":
                values[name] = str(value).upper()
            elif isinstance(value, float):
                raise TypeError(f"ctx.protect: {name} is a float ({value!r}): give a Decimal, an int or a str")
            else:
                values[name] = Decimal(str(value))
        return replace(intent, protection=Protection(**values) if values else None)
