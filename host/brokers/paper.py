"""The paper broker: the simulator's matching engine, in process, persisted under DATA_DIR."""
from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Callable, Optional

from ..models import BrokerOrder, BrokerPosition, OrderRequest, OrderType, Product
from ..pricing import protected_limit, protected_stop
from ..sim.matching import MatchingEngine, SimRejected
from .base import Rejected, Unreachable


class PaperBroker:
    """Simulated broker; market orders become protected limit orders, as on the live adapter."""

    name = "paper"

    book_is_synchronous = True  # its book is written in the same step as the order: absence proves never placed

    def __init__(self, path: Optional[Path], protection_pct: Decimal):
        self.engine = MatchingEngine(path)
        self.protection_pct = protection_pct
        self.fail_positions: Optional[str] = None

    def start(self, on_update: Callable[[BrokerOrder], None]) -> None:
        self.engine.subscribe(on_update)

    def stop(self) -> None:
        pass

    def prepare(self, req: OrderRequest) -> OrderRequest:
        return req  # in process: no rate limit, and its market protection is part of placing

    def place(self, req: OrderRequest) -> str:
        if req.order_type is OrderType.MKT:
            ltp = self.engine.ltp(req.exchange, req.symbol) or req.price
            if ltp is None:
                raise Rejected(f"no price for {req.exchange}:{req.symbol}: send a tick to "
                               f"/api/paper/ticks or give a price in the alert")
            if self.engine.ltp(req.exchange, req.symbol) is None:
                self.engine.set_ltp(req.exchange, req.symbol, ltp)
            req = replace(req, order_type=OrderType.LMT,
                          price=protected_limit(req.side, ltp, self.protection_pct))
        req = protected_stop(req, self.protection_pct)
        try:
            return self.engine.place(req)
        except SimRejected as e:
            raise Rejected(str(e)) from None

    def cancel(self, broker_order_id: str, exchange: str = "") -> None:
        try:
            self.engine.cancel(broker_order_id)
        except SimRejected as e:
            raise Rejected(str(e)) from None

    def modify(self, broker_order_id: str, req: OrderRequest) -> None:
        req = protected_stop(req, self.protection_pct)
        try:
            self.engine.modify(broker_order_id, req.qty, req.order_type, req.price, req.trigger_price)
        except SimRejected as e:
            raise Rejected(str(e)) from None

    def order_book(self) -> list[BrokerOrder]:
        return self.engine.order_book()

    def positions(self) -> list[BrokerPosition]:
        if self.fail_positions:  # a test control: the broker cannot show positions
            raise Unreachable(self.fail_positions)
        return [BrokerPosition(ex, sym, Product(prod), p.net_qty, p.avg_price, p.realized_pnl)
                for (ex, sym, prod), p in self.engine.positions().items()]

    def apply_tick(self, exchange: str, symbol: str, ltp: Decimal) -> None:
        self.engine.set_ltp(exchange, symbol, ltp)

    def ltp(self, exchange: str, symbol: str) -> Optional[Decimal]:
        return self.engine.ltp(exchange, symbol)
