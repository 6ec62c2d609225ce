"""The instrument master: token, lot size, tick size and freeze quantity of each tradable symbol."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Iterable, Optional

SAMPLE = Path(__file__).parent / "sim" / "data" / "instruments.csv"


@dataclass(frozen=True)
class Instrument:
    exchange: str
    token: str
    symbol: str
    lot_size: int
    tick_size: Decimal
    freeze_qty: Optional[int] = None


def parse(text: str) -> list[Instrument]:
    """Rows of a Noren symbol file (Exchange,Token,LotSize,...,TradingSymbol,...,TickSize[,FreezeQty])."""
    out = []
    for row in csv.DictReader(io.StringIO(text)):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        try:
            out.append(Instrument(row["Exchange"], row["Token"], row["TradingSymbol"], int(row["LotSize"] or 1),
                                  Decimal(row.get("TickSize") or "0.05"),
                                  int(row["FreezeQty"]) if row.get("FreezeQty") else None))
        except (KeyError, ValueError, ArithmeticError):
            continue  # one bad line never hides the rest
    return out


class Instruments:
    """Look-ups by (exchange, symbol) and by (exchange, token)."""

    def __init__(self, items: Iterable[Instrument] = ()):
        self.by_symbol = {(i.exchange, i.symbol): i for i in items}
        self.by_token = {(i.exchange, i.token): i for i in self.by_symbol.values()}

    @classmethod
    def sample(cls) -> "Instruments":
        return cls(parse(SAMPLE.read_text()))

    def get(self, exchange: str, symbol: str) -> Optional[Instrument]:
        return self.by_symbol.get((exchange, symbol))

    def token(self, exchange: str, token: str) -> Optional[Instrument]:
        return self.by_token.get((exchange, token))

    def __len__(self) -> int:
        return len(self.by_symbol)
