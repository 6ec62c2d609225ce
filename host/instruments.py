"""The instrument master: token, lot size, tick size and freeze quantity of each tradable symbol."""
from __future__ import annotations

import bisect
import csv
import difflib
import io
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

if TYPE_CHECKING:
    from .models import OrderSpec

SAMPLE = Path(__file__).parent / "sim" / "data" / "instruments.csv"
MAX_ORDER_QTY = 10_000_000  # the host's cap per order (validation.MAX_QTY); larger exits go in slices


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
        self.names: dict[str, list[str]] = {}  # per exchange, sorted: for "did you mean"
        for ex, sym in self.by_symbol:
            self.names.setdefault(ex, []).append(sym)
        for names in self.names.values():
            names.sort()

    def nearest(self, exchange: str, symbol: str, n: int = 3) -> list[str]:
        """Known symbols of the exchange that look most like `symbol` (its sorted neighbours, then the closest)."""
        names = self.names.get(exchange, [])
        at = bisect.bisect_left(names, symbol)
        near = names[max(at - 50, 0):at + 50]
        return difflib.get_close_matches(symbol, near, n, cutoff=0.5)

    @classmethod
    def sample(cls) -> "Instruments":
        return cls(parse(SAMPLE.read_text()))

    def get(self, exchange: str, symbol: str) -> Optional[Instrument]:
        return self.by_symbol.get((exchange, symbol))

    def token(self, exchange: str, token: str) -> Optional[Instrument]:
        return self.by_token.get((exchange, token))

    def __len__(self) -> int:
        return len(self.by_symbol)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class InstrumentMaster:
    """The broker's daily symbol files, cached under DATA_DIR; a failed download keeps the last copy."""

    def __init__(self, cache_dir: Path, base_url: str, exchanges: Iterable[str] = ("NSE", "NFO", "BSE", "BFO", "MCX"),
                 timeout_s: float = 20.0):
        self.cache_dir, self.base_url, self.exchanges, self.timeout_s = Path(cache_dir), base_url, tuple(exchanges), timeout_s
        self.instruments = Instruments()
        self.problems: list[str] = []

    def load_cached(self) -> Instruments:
        """The copies from the last successful download (instant; used while a refresh runs)."""
        items: list[Instrument] = []
        for exch in self.exchanges:
            cache = self.cache_dir / f"{exch}.csv"
            if cache.exists():
                items += parse(cache.read_text())
        self.instruments = Instruments(items)
        return self.instruments

    def refresh(self) -> Instruments:
        """Download each exchange's file; on failure use the cached copy and say so."""
        import requests
        import zipfile
        items: list[Instrument] = []
        self.problems = []
        for exch in self.exchanges:
            cache = self.cache_dir / f"{exch}.csv"
            try:
                r = requests.get(f"{self.base_url.rstrip('/')}/{exch}_symbols.txt.zip", timeout=self.timeout_s)
                r.raise_for_status()
                with zipfile.ZipFile(io.BytesIO(r.content)) as z:
                    text = z.read(z.namelist()[0]).decode("utf-8", "replace")
                parsed = parse(text)
                if not parsed:
                    raise ValueError("the file has no instruments")
                _atomic_write(cache, text)
            except Exception as e:  # network, HTTP, zip or content: keep yesterday's copy
                if cache.exists():
                    self.problems.append(f"{exch} symbols not downloaded ({type(e).__name__}: {e}); using the copy of "
                                         f"{time_of(cache)}")
                    parsed = parse(cache.read_text())
                else:
                    self.problems.append(f"{exch} symbols not downloaded ({type(e).__name__}: {e}) and no cached copy: "
                                         f"lot and tick checks are off for {exch}")
                    parsed = []
            items += parsed
        self.instruments = Instruments(items)
        return self.instruments


def time_of(path: Path) -> str:
    import datetime as _dt
    return _dt.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="minutes")


def slices(instruments: Optional[Instruments], intent: "OrderSpec") -> list[int]:
    """The quantities to send an order as: each below the freeze quantity and a whole number of lots.

    An odd remainder that is not a whole lot goes as its own order (an exit of such a position is
    still tried; an entry of it is refused by check_order).
    """
    inst = instruments.get(intent.exchange, intent.symbol) if instruments is not None else None
    if inst is None or not inst.freeze_qty:  # no freeze known: only the host's own cap per order
        whole, rest = divmod(intent.qty, MAX_ORDER_QTY)
        return [MAX_ORDER_QTY] * whole + ([rest] if rest else [])
    if intent.qty < inst.freeze_qty:
        return [intent.qty]
    lot = max(inst.lot_size, 1)
    cap = max((inst.freeze_qty - 1) // lot, 1) * lot  # strictly below the freeze: some exchanges refuse it exactly
    whole, odd = divmod(intent.qty, lot)
    out = [cap] * (whole * lot // cap)
    if whole * lot % cap:
        out.append(whole * lot % cap)
    return out + ([odd] if odd else [])


def check_order(instruments: Instruments, exchange: str, symbol: str, qty: int, prices: Iterable[Optional[Decimal]],
                where: str, reducing: bool = False) -> list[str]:
    """Symbol, lot-size and tick-size problems of one order (no symbol check for an exchange not loaded)."""
    inst = instruments.get(exchange, symbol)
    if inst is None:
        if not instruments.names.get(exchange):
            return []
        near = instruments.nearest(exchange, symbol)
        return [f"{where}.symbol: expected a symbol the {exchange} instrument master knows, found {symbol!r}"
                f"{'; nearest known: ' + ', '.join(near) if near else ''}"]
    problems = []
    if qty % inst.lot_size and not reducing:  # an odd position must still be exitable
        problems.append(f"{where}.qty: expected a multiple of the lot size {inst.lot_size} for {exchange}:{symbol}, "
                        f"found {qty}")
    if inst.freeze_qty and qty > inst.freeze_qty:
        problems.append(f"{where}.qty: expected at most the freeze quantity {inst.freeze_qty} for {exchange}:{symbol}, "
                        f"found {qty}")
    for p in prices:
        if p is not None and inst.tick_size and p % inst.tick_size:
            problems.append(f"{where}.price: expected a multiple of the tick size {inst.tick_size} for "
                            f"{exchange}:{symbol}, found {p}")
    return problems
