"""The broker protocol every adapter implements, and its classified failures."""
from __future__ import annotations

import http.client
import socket
from decimal import Decimal
from typing import Callable, Iterator, Optional, Protocol

from urllib3.exceptions import ConnectTimeoutError, ProtocolError, ReadTimeoutError

from ..models import BrokerOrder, BrokerPosition, OrderRequest


class BrokerError(Exception):
    """A broker call failed; subclasses say how."""

    kind = "error"


class SessionExpired(BrokerError):
    kind = "session_expired"


class Rejected(BrokerError):
    """The broker refused the order; the message is the broker's reason."""

    kind = "rejected"


class Forbidden(Rejected):
    """The broker refused the request for who sent it, not for what it asked (its IP whitelist's HTTP 403)."""


class Unreachable(BrokerError):
    """The broker could not be reached; the request was certainly not received."""

    kind = "unreachable"


class UnknownOutcome(BrokerError):
    """The request may or may not have reached the broker (timeout, broken reply)."""

    kind = "unknown_outcome"


# the connection was never made: refused, no such host, no answer to the connect (urllib3's
# NewConnectionError and NameResolutionError are ConnectTimeoutErrors)
_NOT_CONNECTED = (ConnectTimeoutError, ConnectionRefusedError, socket.gaierror)
# the connection was made and the request may have been written: reset, closed, no reply in time
_MAYBE_SENT = (ProtocolError, ReadTimeoutError, http.client.HTTPException, ConnectionResetError, BrokenPipeError)


def _causes(e: BaseException) -> Iterator[BaseException]:
    """e and everything it wraps (requests wraps urllib3, which wraps the socket's error)."""
    seen: set[int] = set()
    stack: list[object] = [e]
    while stack:
        x = stack.pop()
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack.extend((x.__cause__, x.__context__, getattr(x, "reason", None), *x.args))


def transport_failure(what: str, e: BaseException) -> BrokerError:
    """Classify an exception from a broker call that got no answer.

    Unreachable only when the connection was certainly never made, so the request cannot have
    arrived. Anything else (a reset or close after the request was written, a read timeout, an
    error we do not know) is an unknown outcome: the broker may have booked the order.
    """
    if isinstance(e, BrokerError):
        return e
    causes = list(_causes(e))
    if any(isinstance(c, _NOT_CONNECTED) for c in causes) and not any(isinstance(c, _MAYBE_SENT) for c in causes):
        return Unreachable(f"{what}: could not connect to the broker ({type(e).__name__})")
    if any(isinstance(c, (ReadTimeoutError, socket.timeout)) for c in causes):
        return UnknownOutcome(f"{what}: no answer in time; the broker may have received it")
    return UnknownOutcome(f"{what} failed after it may have reached the broker ({type(e).__name__}: {e})")


class Broker(Protocol):
    """What the order service and the watcher need from a broker."""

    name: str

    def start(self, on_update: Callable[[BrokerOrder], None]) -> None:
        """Connect, and deliver every order update to on_update from now on."""

    def stop(self) -> None:
        """Disconnect; must return within a few seconds."""

    def prepare(self, req: OrderRequest) -> OrderRequest:
        """What place() is to send for req, after what must come first: a market order's protected price and the
        wait for the rate limit. Rejected when it cannot be sent. It is called before the order is marked
        SUBMITTED, so a process that dies in it leaves the order NEW (sent at the restart), never marked sent
        and unsent."""

    def place(self, req: OrderRequest) -> str:
        """Send a prepared order carrying req.remarks now (a market order is still protected); the broker id."""

    def cancel(self, broker_order_id: str, exchange: str = "") -> None:
        """Ask the broker to cancel an open order (in `exchange`: a cancel counts towards its segment's order rate)."""

    def modify(self, broker_order_id: str, req: OrderRequest) -> None:
        """Change an open order to req's quantity, type and prices (ModifyOrder)."""

    def order_book(self) -> list[BrokerOrder]:
        """Today's orders; an empty list means the book is empty, never an error."""

    def positions(self) -> list[BrokerPosition]:
        """The account's positions today; raises BrokerError when they cannot be read (never [] for an error)."""

    def apply_tick(self, exchange: str, symbol: str, ltp: Decimal) -> None:
        """Move the simulated market (paper brokers only)."""

    def ltp(self, exchange: str, symbol: str) -> Optional[Decimal]:
        """The last price the broker knows, or None."""
