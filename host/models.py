"""Frozen dataclasses and enums that cross module boundaries; money and prices are Decimal."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Optional


class Side(str, enum.Enum):
    BUY = "BUY"
    SELL = "SELL"

    @property
    def sign(self) -> int:
        return 1 if self is Side.BUY else -1

    @property
    def opposite(self) -> "Side":
        return Side.SELL if self is Side.BUY else Side.BUY


class OrderType(str, enum.Enum):
    MKT = "MKT"
    LMT = "LMT"
    SL_LMT = "SL-LMT"
    SL_MKT = "SL-MKT"

    @property
    def needs_price(self) -> bool:
        return self in (OrderType.LMT, OrderType.SL_LMT)

    @property
    def needs_trigger(self) -> bool:
        return self in (OrderType.SL_LMT, OrderType.SL_MKT)


class Product(str, enum.Enum):
    NRML = "M"
    MIS = "I"
    CNC = "C"


class ExecutionType(str, enum.Enum):
    ENTRY = "ENTRY"
    EXIT = "EXIT"
    ADJUST = "ADJUST"
    POSITION = "POSITION"  # an alert only: bring the strategy's position to a target (never an intent's action)


class OrderStatus(str, enum.Enum):
    NEW = "NEW"
    SUBMITTED = "SUBMITTED"
    UNKNOWN = "UNKNOWN"
    OPEN = "OPEN"
    PARTIAL = "PARTIAL"
    FILLED = "FILLED"
    CANCELLED = "CANCELLED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"  # a DAY order gone from a new day's book
    LOST = "LOST"        # sent, never seen in the broker's books within ORDER_LOST_AFTER_S; still looked for

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def rank(self) -> int:
        """Position in the status machine; an order never moves to a lower rank."""
        return _STATUS_RANK[self]


TERMINAL_STATUSES = frozenset({OrderStatus.FILLED, OrderStatus.CANCELLED, OrderStatus.REJECTED, OrderStatus.EXPIRED})
_STATUS_RANK = {
    OrderStatus.NEW: 0,
    OrderStatus.SUBMITTED: 1,
    OrderStatus.UNKNOWN: 1,
    OrderStatus.LOST: 1,
    OrderStatus.EXPIRED: 4,
    OrderStatus.OPEN: 2,
    OrderStatus.PARTIAL: 3,
    OrderStatus.FILLED: 4,
    OrderStatus.CANCELLED: 4,
    OrderStatus.REJECTED: 4,
}


class TradingState(str, enum.Enum):
    ACTIVE = "active"
    REDUCE_ONLY = "reduce_only"
    HALTED = "halted"


class AlertStatus(str, enum.Enum):
    RECEIVED = "received"
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    BLOCKED = "blocked"
    REFUSED = "refused"
    FAILED = "failed"


@dataclass(frozen=True)
class Decision:
    """What became of an alert or a strategy's intents: the status, why, and the orders it made."""

    status: AlertStatus
    reason: Optional[str]
    orders: tuple[str, ...] = ()
    cancels: tuple[str, ...] = ()  # working orders to cancel at the broker before the new orders go out


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: which field, what was expected, what was found."""

    field: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.field}: expected {self.expected}, found {self.found}"

    def as_dict(self) -> dict:
        return {"field": self.field, "expected": self.expected, "found": self.found}


@dataclass(frozen=True)
class OrderSpec:
    """What one order is: instrument, side, quantity, type, product and prices."""

    exchange: str
    symbol: str
    side: Side
    qty: int
    order_type: OrderType
    product: Product
    price: Optional[Decimal] = None
    trigger_price: Optional[Decimal] = None


@dataclass(frozen=True)
class Protection:
    """Exits that travel with an entry (see host/protect.py): a stop (absolute, points or percent from the
    fill), a target, a trailing stop, and the strategy's MTM limits (rupees). Money and prices are Decimal."""

    stop_loss: Optional[Decimal] = None
    stop_loss_points: Optional[Decimal] = None
    stop_loss_pct: Optional[Decimal] = None
    target: Optional[Decimal] = None
    target_points: Optional[Decimal] = None
    target_pct: Optional[Decimal] = None
    trailing_type: Optional[str] = None          # POINTS | PERCENT
    trailing_value: Optional[Decimal] = None
    trailing_activation_price: Optional[Decimal] = None
    strategy_stoploss: Optional[Decimal] = None  # rupees of the strategy's MTM
    strategy_target: Optional[Decimal] = None
    strategy_trailing_step: Optional[Decimal] = None

    @property
    def has_stop(self) -> bool:
        return any(v is not None for v in (self.stop_loss, self.stop_loss_points, self.stop_loss_pct))

    @property
    def has_target(self) -> bool:
        return any(v is not None for v in (self.target, self.target_points, self.target_pct))

    @property
    def per_position(self) -> bool:
        return self.has_stop or self.has_target or self.trailing_type is not None

    @property
    def strategy_limits(self) -> bool:
        return self.strategy_stoploss is not None or self.strategy_target is not None


@dataclass(frozen=True)
class Leg(OrderSpec):
    """One order request of an alert, as the sender described it (with the exits that travel with it)."""

    protection: Optional[Protection] = field(default=None, kw_only=True)


@dataclass(frozen=True)
class TargetLeg:
    """One leg of a POSITION alert: the signed position the strategy should hold (0 is flat)."""

    exchange: str
    symbol: str
    product: Product
    order_type: OrderType
    target: int
    price: Optional[Decimal] = None


@dataclass(frozen=True)
class AlertRequest:
    """A validated webhook alert: order legs (ENTRY, EXIT, ADJUST) or position targets (POSITION)."""

    strategy: str
    execution_type: ExecutionType
    legs: tuple[Leg, ...]
    client_alert_id: Optional[str] = None
    targets: tuple[TargetLeg, ...] = ()
    notes: tuple[str, ...] = ()  # what the parser changed or ignored, said in the answer


@dataclass(frozen=True)
class Intent(OrderSpec):
    """What a strategy asks for; the guard, risk and validation decide what becomes an order."""

    action: ExecutionType = field(kw_only=True)
    protection: Optional[Protection] = field(default=None, kw_only=True)  # exits that travel with an entry


@dataclass(frozen=True)
class Tick:
    exchange: str
    symbol: str
    ltp: Decimal


@dataclass(frozen=True)
class OrderRequest(OrderSpec):
    """An order as it is sent to a broker; `remarks` carries our order id."""

    remarks: str = field(kw_only=True)


@dataclass(frozen=True)
class Order:
    """One of our orders as a strategy sees it (argument of strategy_on_order)."""

    id: str
    strategy: str
    action: ExecutionType
    exchange: str
    symbol: str
    side: Side
    qty: int
    order_type: OrderType
    product: Product
    status: OrderStatus
    filled_qty: int
    avg_price: Optional[Decimal]
    price: Optional[Decimal]
    trigger_price: Optional[Decimal]
    reason: Optional[str]
    alert_id: Optional[str]
    protective: bool = False  # a stop the host rests at the broker for this strategy's position (stop_loss)

    @classmethod
    def from_row(cls, row: dict) -> "Order":
        def d(v: object) -> Optional[Decimal]:
            return None if v in (None, "") else Decimal(str(v))
        return cls(row["id"], row["strategy"], ExecutionType(row["action"]), row["exchange"], row["symbol"],
                   Side(row["side"]), row["qty"], OrderType(row["order_type"]), Product(row["product"]),
                   OrderStatus(row["status"]), row["filled_qty"] or 0, d(row["avg_price"]), d(row["price"]),
                   d(row["trigger_price"]), row["reason"], row["alert_id"], bool(row.get("protection")))


@dataclass(frozen=True)
class Holding:
    """One of a strategy's positions, as its context shows it."""

    exchange: str
    symbol: str
    product: Product
    net_qty: int
    avg_price: Decimal
    realized_pnl: Decimal


@dataclass(frozen=True)
class BrokerPosition:
    """The broker's net position in one instrument and product."""

    exchange: str
    symbol: str
    product: Product
    net_qty: int
    avg_price: Decimal
    realized_pnl: Decimal


@dataclass(frozen=True)
class FillReport:
    fill_id: str
    qty: int
    price: Decimal


@dataclass(frozen=True)
class BrokerOrder:
    """The broker's view of one order, as found in its book or an update."""

    broker_order_id: str
    remarks: str
    status: OrderStatus
    filled_qty: int
    avg_price: Optional[Decimal]
    reason: Optional[str] = None
    fills: tuple[FillReport, ...] = field(default_factory=tuple)
    # what was traded (known from the books; updates from the feed may leave them empty)
    exchange: Optional[str] = None
    symbol: Optional[str] = None
    product: Optional[str] = None   # the broker's code: M, I, C, or H/B for cover and bracket orders
    side: Optional[Side] = None


@dataclass(frozen=True)
class BrokerView:
    """The broker's net per (exchange, symbol, product), and its order book read just before and just after it
    (None: unread); and our orders as the reads began: the last rowid, and our unfinished exits with what they
    had filled (an exit made or filled since then is not in the net, whatever the host decided meanwhile)."""

    net: dict[tuple, int]
    before: Optional[list[BrokerOrder]]
    after: Optional[list[BrokerOrder]]
    mark: Optional[int] = None
    exits_then: dict[str, int] = field(default_factory=dict)
