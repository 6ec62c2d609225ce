"""Execution guard: each strategy owns its positions; duplicate ENTRY blocked; exits allowed, capped."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from .models import ExecutionType, Intent, Product, Side


@dataclass(frozen=True)
class OpenOrder:
    exchange: str
    symbol: str
    product: Product
    side: Side
    remaining: int


@dataclass
class StrategyBook:
    """One strategy's own positions and unfinished orders; nothing of any other strategy."""

    strategy: str
    positions: dict[tuple[str, str, Product], int] = field(default_factory=dict)
    open_orders: list[OpenOrder] = field(default_factory=list)
    decided: int = 0  # how many of open_orders are this decision's own (booked by book_order, at the end)

    def net(self, exchange: str, symbol: str, product: Product) -> int:
        return self.positions.get((exchange, symbol, product), 0)

    def holds(self, exchange: str, symbol: str) -> bool:
        return any(q for (ex, sym, _), q in self.positions.items() if (ex, sym) == (exchange, symbol))

    def has_open_order(self, exchange: str, symbol: str) -> bool:
        return any((o.exchange, o.symbol) == (exchange, symbol) for o in self.open_orders)

    def pending(self, exchange: str, symbol: str, product: Product, side: Side) -> int:
        """Quantity still working in orders on this side."""
        return sum(o.remaining for o in self.open_orders
                   if (o.exchange, o.symbol, o.product, o.side) == (exchange, symbol, product, side))

    def closable(self, exchange: str, symbol: str, product: Product) -> tuple[Optional[Side], int]:
        """The side that reduces the position and how much is left to reduce after working exits."""
        net = self.net(exchange, symbol, product)
        if net == 0:
            return None, 0
        side = Side.SELL if net > 0 else Side.BUY
        return side, max(abs(net) - self.pending(exchange, symbol, product, side), 0)

    def book_order(self, intent: Intent) -> None:
        """Count an order just decided, so the next leg of the same alert sees it."""
        self.open_orders.append(OpenOrder(intent.exchange, intent.symbol, intent.product, intent.side, intent.qty))
        self.decided += 1

    def stored_order(self, exchange: str, symbol: str) -> bool:
        """An unfinished order in the symbol from before this decision (not one of its own earlier legs)."""
        stored = self.open_orders[:len(self.open_orders) - self.decided]
        return any((o.exchange, o.symbol) == (exchange, symbol) for o in stored)


@dataclass(frozen=True)
class Checked:
    """The guard's answer for one intent: the intent to execute (maybe capped), or why not."""

    intent: Optional[Intent]
    reducing: bool = False
    blocked: Optional[str] = None
    note: Optional[str] = None


def check(intent: Intent, book: StrategyBook) -> Checked:
    """Apply the guard rules to one intent of book.strategy."""
    where = f"{intent.exchange}:{intent.symbol}"
    if intent.action is ExecutionType.ENTRY:
        if book.holds(intent.exchange, intent.symbol):
            return Checked(None, blocked=f"duplicate ENTRY: strategy {book.strategy} already holds a position in {where}")
        if book.has_open_order(intent.exchange, intent.symbol):
            if not book.stored_order(intent.exchange, intent.symbol):
                return Checked(None, blocked=f"duplicate ENTRY: an earlier leg of the same alert already enters "
                                             f"{where} for strategy {book.strategy} (one ENTRY leg per symbol)")
            return Checked(None, blocked=f"duplicate ENTRY: strategy {book.strategy} has an unfinished order in {where}")
        book.book_order(intent)
        return Checked(intent)
    product = position_product(intent, book)
    side, available = book.closable(intent.exchange, intent.symbol, product)
    if intent.action is ExecutionType.EXIT:
        if side is None or available == 0:
            state = "no open position" if side is None else "exit orders already cover the whole position"
            return Checked(None, note=f"nothing to exit in {where} for strategy {book.strategy}: {state}")
        qty = min(intent.qty, available)
        out = replace(intent, side=side, qty=qty, product=product)
        notes = []
        if product is not intent.product:
            notes.append(f"product_type {intent.product.value} ignored: strategy {book.strategy} holds {where} as "
                         f"{product.value}, its only position there")
        if intent.side is not side:
            notes.append(f"direction {intent.side.value} ignored: closing a {'long' if side is Side.SELL else 'short'} position needs {side.value}")
        if qty < intent.qty:
            notes.append(f"qty capped from {intent.qty} to {qty}, the open position")
        book.book_order(out)
        return Checked(out, reducing=True, note="; ".join(notes) or None)
    # ADJUST: adds freely; a reduction never crosses through zero
    if side is not None and intent.side is side:
        if available == 0:
            return Checked(None, note=f"nothing to reduce in {where}: exit orders already cover the position")
        out = replace(intent, qty=min(intent.qty, available), product=product)
        book.book_order(out)
        note = f"qty capped from {intent.qty} to {out.qty}, the open position" if out.qty < intent.qty else None
        return Checked(out, reducing=True, note=note)
    book.book_order(intent)
    return Checked(intent)


def position_product(intent: Intent, book: StrategyBook) -> Product:
    """The product of the position an exit refers to: the one named, else the only one held."""
    if book.net(intent.exchange, intent.symbol, intent.product):
        return intent.product
    held = [p for (ex, sym, p), q in book.positions.items() if (ex, sym) == (intent.exchange, intent.symbol) and q]
    return held[0] if len(held) == 1 else intent.product
