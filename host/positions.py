"""Position arithmetic: net quantity, average price and realised PnL, in Decimal."""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from .models import Side
from .pricing import tidy


@dataclass(frozen=True)
class PositionMath:
    net_qty: int = 0
    avg_price: Decimal = Decimal("0")
    realized_pnl: Decimal = Decimal("0")

    def apply(self, side: Side, qty: int, price: Decimal) -> "PositionMath":
        """The position after one fill of qty at price on side."""
        signed = qty * side.sign
        net, avg, realized = self.net_qty, self.avg_price, self.realized_pnl
        if net == 0 or (net > 0) == (signed > 0):
            total = abs(net) + qty
            avg = (avg * abs(net) + price * qty) / total
            return PositionMath(net + signed, tidy(avg), realized)
        closing = min(qty, abs(net))
        realized += (price - avg) * closing * (1 if net > 0 else -1)
        new_net = net + signed
        if new_net == 0:
            avg = Decimal("0")
        elif (new_net > 0) != (net > 0):
            avg = price
        return PositionMath(new_net, avg, realized)

    def unrealized(self, ltp: Decimal | None) -> Decimal:
        if ltp is None or self.net_qty == 0:
            return Decimal("0")
        return (ltp - self.avg_price) * self.net_qty
