"""The broker protocol every adapter implements, and its classified failures."""
from __future__ import annotations

from decimal import Decimal
from typing import Callable, Optional, Protocol

from ..models import BrokerOrder, BrokerPosition, OrderRequest


class BrokerError(Exception):
    """A broker call failed; subclasses say how."""

    kind = "error"


class SessionExpired(BrokerError):
    kind = "session_expired"


class Rejected(BrokerError):
    """The broker refused the order; the message is the broker's reason."""

    kind = "rejected"


class Unreachable(BrokerError):
    """The broker could not be reached; the request was certainly not received."""

    kind = "unreachable"


class UnknownOutcome(BrokerError):
    """The request may or may not have reached the broker (timeout, broken reply)."""

    kind = "unknown_outcome"


class Broker(Protocol):
    """What the order service and the watcher need from a broker."""

    name: str

    def start(self, on_update: Callable[[BrokerOrder], None]) -> None:
        """Connect, and deliver every order update to on_update from now on."""

    def stop(self) -> None:
        """Disconnect; must return within a few seconds."""

    def place(self, req: OrderRequest) -> str:
        """Place an order carrying req.remarks; return the broker order id."""

    def cancel(self, broker_order_id: str) -> None:
        """Ask the broker to cancel an open order."""

    def order_book(self) -> list[BrokerOrder]:
        """Today's orders; an empty list means the book is empty, never an error."""

    def positions(self) -> list[BrokerPosition]:
        """The account's positions today; raises BrokerError when they cannot be read (never [] for an error)."""

    def apply_tick(self, exchange: str, symbol: str, ltp: Decimal) -> None:
        """Move the simulated market (paper brokers only)."""

    def ltp(self, exchange: str, symbol: str) -> Optional[Decimal]:
        """The last price the broker knows, or None."""
