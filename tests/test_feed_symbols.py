"""A wanted symbol the symbol file lacks: the feed asks the broker for its token, not too often, and says once
when the broker does not know it either (it gets no prices: the trader must watch it)."""
from __future__ import annotations

from decimal import Decimal
from typing import Any, Optional

from host.brokers.shoonya_feed import ShoonyaFeed
from host.instruments import Instrument


class Broker:
    """Knows nothing from its symbol file; SearchScrip knows `known`."""

    def __init__(self, known: Optional[Instrument] = None):
        self.known, self.asked = known, 0

    def instrument(self, exchange: str, symbol: str) -> Optional[Instrument]:
        return None

    def find_instrument(self, exchange: str, symbol: str) -> Optional[Instrument]:
        self.asked += 1
        return self.known


def _feed(broker: Any, said: list) -> ShoonyaFeed:
    return ShoonyaFeed(broker, lambda: {("NFO", "GONE26JANFUT")}, lambda ticks: None, lambda update: None,
                       emit=lambda kind, message, severity: said.append((kind, message, severity)))


def test_an_unknown_held_symbol_is_said_once_and_asked_for_again_only_after_a_while():
    said: list = []
    broker = Broker()
    feed = _feed(broker, said)
    assert feed._keys() == set() and feed._keys() == set()
    assert broker.asked == 1  # not a SearchScrip every 2 s refresh
    [(kind, message, severity)] = said
    assert kind == "feed_symbol_unknown" and severity == "error" and "NFO:GONE26JANFUT" in message
    assert "no prices" in message and "broker terminal" in message
    feed._unfound = {k: 0.0 for k in feed._unfound}  # FIND_AGAIN_S later
    broker.known = Instrument("NFO", "777", "GONE26JANFUT", 50, Decimal("0.05"))
    assert feed._keys() == {"NFO|777"} and broker.asked == 2 and len(said) == 1
