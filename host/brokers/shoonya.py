"""The live Shoonya adapter on the real NorenRestApiPy (NorenRestApiOAuth 0.0.41), without patching it.

The library has no timeouts and returns None on failure. We give its module a stand-in for
`requests` that sets a timeout on every call and keeps the last reply per thread, so every
failure can be classified with the broker's own words.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import Any, Callable, Iterator, Optional

import requests

from ..broker_session import EXPIRED
from ..instruments import Instrument, Instruments
from ..market import IST
from ..models import BrokerOrder, BrokerPosition, FillReport, OrderRequest, OrderStatus, OrderType, Product, Side
from ..pricing import DEFAULT_TICK, protected_limit, protected_stop, within_limits
from .base import BrokerError, Forbidden, Rejected, SessionExpired, UnknownOutcome, transport_failure

log = logging.getLogger(__name__)
RECONNECT_HINT = EXPIRED
STATUS = {"COMPLETE": OrderStatus.FILLED, "REJECTED": OrderStatus.REJECTED, "CANCELED": OrderStatus.CANCELLED,
          "CANCELLED": OrderStatus.CANCELLED, "EXPIRED": OrderStatus.CANCELLED}
PRODUCTS = frozenset(p.value for p in Product)
# SEBI's retail-algo rule: fewer than 10 orders a second in each exchange segment (Noren's `exch`:
# NSE, NFO, BSE, BFO, MCX, CDS...); evenly spaced at 8, network jitter cannot bunch 10 into a second.
# Places, modifies and cancels all take a turn: the broker may count each as an order message
SEGMENT_ORDERS_PER_S = 8.0
FIND_TIMEOUT_S = 2.0  # a SearchScrip for the feed: it runs on the feed's thread, which waits for it


class TimeoutRequests:
    """What NorenRestApiPy sees as its `requests` module: pooled sessions, a timeout, the last reply kept."""

    exceptions = requests.exceptions

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def post(self, url: str, **kw: Any) -> requests.Response:
        return self._call("post", url, **kw)

    def get(self, url: str, **kw: Any) -> requests.Response:
        return self._call("get", url, **kw)

    @contextmanager
    def bounded(self, timeout_s: float) -> Iterator[None]:
        """A shorter timeout for this thread's calls inside the block."""
        before = getattr(self._local, "timeout", None)
        self._local.timeout = min(timeout_s, self.timeout_s)
        try:
            yield
        finally:
            self._local.timeout = before

    def _call(self, method: str, url: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", getattr(self._local, "timeout", None) or self.timeout_s)
        self._local.last = None
        response = getattr(self._session(), method)(url, **kw)
        self._local.last = response
        return response

    @property
    def last(self) -> Optional[requests.Response]:
        return getattr(self._local, "last", None)


class RateLimiter:
    """At most `rate` calls per second for each key (an exchange segment), spaced evenly."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def free_in(self, key: str = "") -> float:
        """Seconds until a call for key would not wait (0: it would go at once)."""
        with self._lock:
            return max(0.0, self._next.get(key, 0.0) - time.monotonic())

    def until_free(self, key: str = "") -> None:
        """Sleep until a call for key would not wait, taking no turn (the call itself takes it, when it is made)."""
        left = self.free_in(key)
        if left > 0:
            time.sleep(left)

    def wait(self, key: str = "") -> None:
        with self._lock:
            now = time.monotonic()
            at = max(now, self._next.get(key, 0.0))
            self._next[key] = at + self.interval
        if at > now:
            time.sleep(at - now)


def install_requests(timeout_s: float) -> TimeoutRequests:
    """Give NorenRestApiPy our requests stand-in, once per process (its URLs live on the class too:
    one broker configuration per process). A second call returns the one already installed."""
    from NorenRestApiPy import NorenApi as module
    # the library logs whole requests and replies at DEBUG, access tokens included; its reconnect
    # warnings repeat every 0.1 s: our feed reports connection trouble as events instead
    logging.getLogger(module.__name__).setLevel(logging.ERROR)
    if not isinstance(module.requests, TimeoutRequests):
        module.requests = TimeoutRequests(timeout_s)
    return module.requests


def _dec(v: Any) -> Optional[Decimal]:
    try:
        d = Decimal(str(v))
    except (InvalidOperation, TypeError):
        return None
    return d if d.is_finite() else None


def _positive(v: Any) -> Optional[Decimal]:
    """A price Noren sent, or None when it is absent, unreadable or not above zero ("0.00": unknown)."""
    d = _dec(v)
    return d if d is not None and d > 0 else None


def _inside(price: Decimal, lower: Optional[Decimal], upper: Optional[Decimal]) -> bool:
    return (lower is None or price >= lower) and (upper is None or price <= upper)


def _today() -> date:
    return datetime.now(IST).date()


def _int(v: Any) -> int:
    try:
        return int(Decimal(str(v)))
    except (InvalidOperation, TypeError, ValueError):
        return 0


def broker_order(row: dict, fills: tuple[FillReport, ...] = ()) -> BrokerOrder:
    """One Noren order-book row (or `om` message) as our BrokerOrder."""
    filled = _int(row.get("fillshares"))
    status = STATUS.get(str(row.get("status", "")).upper())
    if status is None:
        status = OrderStatus.PARTIAL if filled else OrderStatus.OPEN
    reason = row.get("rejreason") or (row.get("emsg") if status is OrderStatus.REJECTED else None)
    if status is OrderStatus.CANCELLED and not reason:
        reason = "cancelled at the broker"
    avg = _dec(row.get("avgprc")) if filled else None
    side = {"B": Side.BUY, "S": Side.SELL}.get(str(row.get("trantype", "")))
    return BrokerOrder(str(row.get("norenordno")), row.get("remarks") or "", status, filled, avg, reason, fills,
                       row.get("exch"), row.get("tsym"), row.get("prd"), side)


class ShoonyaBroker:
    """Places and watches orders on Shoonya through NorenRestApiPy; every call bounded and classified."""

    name = "shoonya"

    def __init__(self, api_url: str, ws_url: str, instruments: Instruments, protection_pct: Decimal,
                 timeout_s: float = 5.0, orders_per_s: float = SEGMENT_ORDERS_PER_S, algo_id: str = "",
                 on_session: Callable[[str, str], None] = lambda state, why: None, ltp_max_age_s: float = 5.0,
                 after_market: Callable[[str], bool] = lambda exchange: False):
        from NorenRestApiPy.NorenApi import NorenApi
        self.http = install_requests(timeout_s)
        self.api = NorenApi(host=api_url, websocket=ws_url)
        self.instruments = instruments
        self._token_generation = 0  # bumped by each use_token
        self._no_freeze: set[tuple[str, str]] = set()  # symbols GetSecurityInfo gives no frzqty for
        self.protection_pct = protection_pct
        self.timeout_s = timeout_s
        self.ltp_max_age_s = ltp_max_age_s  # an older feed price is not used to protect a market order
        self.limiter = RateLimiter(orders_per_s)  # per exchange segment
        self.algo_id = algo_id  # SEBI algo id sent with every order; empty: none
        self.after_market = after_market  # (exchange) -> True: send as an AMO (ALLOW_AMO and the exchange closed)
        self.on_session = on_session  # ("valid" | "expired", why)
        self.session_expired = False  # the broker said so (or there is no session): calls wait for a login
        self.uid: Optional[str] = None
        self._ltp: dict[tuple[str, str], tuple[Decimal, float]] = {}  # (exchange, symbol) -> (ltp, monotonic when)
        self._limits: dict[tuple[str, str], tuple[date, Optional[Decimal], Optional[Decimal]]] = {}  # the day's lc, uc
        # instruments missing from the symbol file, found with SearchScrip / GetSecurityInfo
        self._found: dict[tuple[str, str], Instrument] = {}
        self._found_by_token: dict[tuple[str, str], Instrument] = {}
        self._on_update: Optional[Callable[[BrokerOrder], None]] = None
        # rows of the last read of each book whose product we do not trade (cover H, bracket B, ...):
        # shown here, never fatal; a warning is logged once per instrument and product
        self.unknown_products: dict[str, list[dict]] = {"positions": [], "orders": [], "trades": []}
        self._unknown_warned: set[tuple[str, str, str]] = set()

    # ---- session ----
    def use_token(self, token: str, uid: str, actid: Optional[str] = None) -> None:
        """Restore a saved access token: both calls the library needs."""
        self.uid = uid
        self._token_generation = self._token_generation + 1  # answers to older tokens are stale
        self.api.injectOAuthHeader(token, uid, actid or uid)
        self.api.set_credentials(token, uid, actid or uid)

    def check_session(self) -> bool:
        """Ask the broker (get_limits shows 'Session Expired' where other calls just return None)."""
        try:
            reply = self._call("get_limits", self.api.get_limits)
        except SessionExpired:
            return False
        ok = isinstance(reply, dict) and reply.get("stat") == "Ok"
        self.note_session("valid" if ok else "expired", "get_limits answered Ok" if ok else str(reply))
        return ok

    def note_session(self, state: str, why: str) -> None:
        """The session is "valid" or "expired": remember it, and say so (once per change)."""
        self.session_expired = state == "expired"
        self.on_session(state, why)

    # ---- the Broker protocol ----
    def start(self, on_update: Callable[[BrokerOrder], None]) -> None:
        self._on_update = on_update

    def stop(self) -> None:
        pass

    def prepare(self, req: OrderRequest) -> OrderRequest:
        """The protected limit of a market order, then the wait until the segment's rate limit lets PlaceOrder go
        at once (place takes the turn, at the moment of the call). SessionExpired while the broker has said the
        session is over: nothing can be placed until the login."""
        if self.session_expired:
            raise SessionExpired(RECONNECT_HINT)
        if req.order_type is OrderType.MKT:
            req = self._protect(req)
        req = self._protect_stop(req)
        self.limiter.until_free(req.exchange)
        return req

    def turn_in(self, exchange: str) -> float:
        """Seconds until an order message for this segment would go at once (the order sender takes the next
        message whose segment has a free turn, so one segment's burst never holds up another's exit)."""
        return self.limiter.free_in(exchange)

    def place(self, req: OrderRequest) -> str:
        """PlaceOrder, spaced by the rate limit; a market order not prepared is protected here."""
        if req.order_type is OrderType.MKT:
            req = self._protect(req)
        req = self._protect_stop(req)
        self.limiter.wait(req.exchange)
        amo = "YES" if self.after_market(req.exchange) else None
        reply = self._call("place_order", partial(self.api.place_order, algo_id=self.algo_id or None),
                           "B" if req.side is Side.BUY else "S",
                           req.product.value, req.exchange, req.symbol, req.qty, 0, req.order_type.value,
                           str(req.price) if req.price is not None else "0",  # the library sends str(price):
                           str(req.trigger_price) if req.trigger_price is not None else None,  # no floats
                           "DAY", amo, req.remarks)
        if not isinstance(reply, dict) or not reply.get("norenordno"):
            raise UnknownOutcome(f"place_order answered without an order number: {reply!r}")
        return str(reply["norenordno"])

    def cancel(self, broker_order_id: str, exchange: str = "") -> None:
        """CancelOrder, spaced by the segment's rate limit: the broker may count cancels as orders (SEBI's 10 a
        second), and a breach's burst of them must not have some refused while the orders go on working."""
        self.limiter.wait(exchange)
        self._call("cancel_order", self.api.cancel_order, broker_order_id)

    def modify(self, broker_order_id: str, req: OrderRequest) -> None:
        """ModifyOrder; a limit price is kept inside the day's circuit limits when known (an exit moved towards the
        market stops at the band's edge, where a price beyond it would be refused)."""
        req = self._protect_stop(req)
        if req.price is not None:
            req = replace(req, price=within_limits(req.price, *self._band(req)))
        self.limiter.wait(req.exchange)
        self._call("modify_order", self.api.modify_order, broker_order_id, req.exchange, req.symbol, req.qty,
                   req.order_type.value, str(req.price) if req.price is not None else "0",
                   str(req.trigger_price) if req.trigger_price is not None else None)

    def order_book(self) -> list[BrokerOrder]:
        rows = self._list("get_order_book", self.api.get_order_book)
        self._note_unknown_products("orders", rows)
        trades = self._list("get_trade_book", self.api.get_trade_book)
        self._note_unknown_products("trades", trades)
        fills: dict[str, list[FillReport]] = {}
        for t in trades:
            price = _dec(t.get("flprc"))
            if t.get("flid") and price is not None:
                fills.setdefault(str(t["norenordno"]), []).append(FillReport(str(t["flid"]), _int(t.get("flqty")), price))
        return [broker_order(r, tuple(fills.get(str(r.get("norenordno")), ()))) for r in rows]

    def positions(self) -> list[BrokerPosition]:
        out = []
        for r in self._note_unknown_products("positions", self._list("get_positions", self.api.get_positions)):
            try:
                out.append(BrokerPosition(r["exch"], r["tsym"], Product(r["prd"]), _int(r.get("netqty")),
                                          _dec(r.get("netavgprc")) or Decimal("0"), _dec(r.get("rpnl")) or Decimal("0")))
            except (KeyError, ValueError) as e:
                raise BrokerError(f"unreadable position row {r!r}: {e}") from None
        return out

    def apply_tick(self, exchange: str, symbol: str, ltp: Decimal) -> None:
        self._ltp[(exchange, symbol)] = (ltp, time.monotonic())

    def ltp(self, exchange: str, symbol: str) -> Optional[Decimal]:
        """The feed's last price, however old (market protection uses fresh_ltp)."""
        seen = self._ltp.get((exchange, symbol))
        return seen[0] if seen else None

    def fresh_ltp(self, exchange: str, symbol: str) -> Optional[Decimal]:
        """The feed's last price if it is younger than ltp_max_age_s."""
        seen = self._ltp.get((exchange, symbol))
        if seen is None or time.monotonic() - seen[1] > self.ltp_max_age_s:
            return None
        return seen[0]

    def instrument(self, exchange: str, symbol: str) -> Optional[Instrument]:
        """From the symbol file, or found earlier with SearchScrip (no broker call here)."""
        return self.instruments.get(exchange, symbol) or self._found.get((exchange, symbol))

    def find_instrument(self, exchange: str, symbol: str, timeout_s: float = FIND_TIMEOUT_S) -> Optional[Instrument]:
        """The instrument, asking SearchScrip now if neither the symbol file nor an earlier lookup has it (the feed
        needs a held symbol's token for its prices); None when the broker does not know it or cannot be asked."""
        inst = self.instrument(exchange, symbol)
        if inst is not None:
            return inst
        try:
            return self._look_up(exchange, symbol, time.monotonic() + timeout_s)
        except Exception as e:  # unknown, refused, timed out, or no session: the caller says what it lacks
            log.info("SearchScrip for %s:%s: %s", exchange, symbol, e)
            return None

    def instrument_by_token(self, exchange: str, token: str) -> Optional[Instrument]:
        return self.instruments.token(exchange, token) or self._found_by_token.get((exchange, token))

    def note_limits(self, exchange: str, symbol: str, lc: Any, uc: Any) -> None:
        """The day's circuit limits, as GetQuotes or the feed's acknowledgement gave them."""
        lower, upper = _positive(lc), _positive(uc)
        if lower is not None or upper is not None:
            self._limits[(exchange, symbol)] = (_today(), lower, upper)

    def circuit_limits(self, exchange: str, symbol: str) -> tuple[Optional[Decimal], Optional[Decimal]]:
        """Today's (lc, uc) when known; (None, None) otherwise."""
        known = self._limits.get((exchange, symbol))
        if known is None or known[0] != _today():
            return None, None
        return known[1], known[2]

    # ---- market protection ----
    def _protect(self, req: OrderRequest) -> OrderRequest:
        """A market order as a limit order: a fresh feed price, else GetQuotes by the token, else refused.

        A price of 0 (no trades today) or one outside the day's circuit limits is refused, and the limit
        stays inside those limits, on the tick. The lookups get half the call's timeout, so PlaceOrder still
        has the rest; any failure of theirs is a refusal, because nothing was sent."""
        where = f"{req.exchange}:{req.symbol}"
        budget = self.timeout_s / 2
        deadline = time.monotonic() + budget
        inst = self.instrument(req.exchange, req.symbol)
        lower, upper = self.circuit_limits(req.exchange, req.symbol)
        price = self._feed_price(req, warn=True)
        if price is None:
            try:
                if inst is None:
                    inst = self._look_up(req.exchange, req.symbol, deadline)
                price, lower, upper = self._quoted_price(inst, deadline)
            except (Rejected, SessionExpired):
                raise
            except BrokerError as e:  # timed out or unreachable: PlaceOrder was never sent
                raise Rejected(f"no price for {where} to protect a market order ({e}); nothing was sent") from None
        if time.monotonic() > deadline:
            raise Rejected(f"the price for {where} took longer than {budget:g} s to read: the market order was not "
                           f"sent, to leave time for its own answer")
        tick = inst.tick_size if inst else DEFAULT_TICK
        return replace(req, order_type=OrderType.LMT,
                       price=protected_limit(req.side, price, self.protection_pct, tick, lower, upper))

    def _protect_stop(self, req: OrderRequest) -> OrderRequest:
        """A stop-loss market order as a stop-loss limit (pricing.protected_stop), inside the day's circuit limits
        when known: the API takes no market order without price protection."""
        return protected_stop(req, self.protection_pct, *self._band(req))

    def _band(self, req: OrderRequest) -> tuple[Decimal, Optional[Decimal], Optional[Decimal]]:
        """The instrument's tick and today's circuit limits (None where unknown): where a price must fall."""
        inst = self.instrument(req.exchange, req.symbol)
        return (inst.tick_size if inst and inst.tick_size else DEFAULT_TICK,
                *self.circuit_limits(req.exchange, req.symbol))

    def _feed_price(self, req: OrderRequest, warn: bool = False) -> Optional[Decimal]:
        """The feed's fresh price, if it is inside the day's circuit limits (else GetQuotes is asked)."""
        price = self.fresh_ltp(req.exchange, req.symbol)
        lower, upper = self.circuit_limits(req.exchange, req.symbol)
        if price is not None and not _inside(price, lower, upper):
            if warn:
                log.warning("feed price %s for %s:%s is outside the day's circuit limits %s-%s: asking GetQuotes",
                            price, req.exchange, req.symbol, lower, upper)
            return None
        return price

    def _lookup(self, deadline: float, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A read for market protection, bounded by what is left of its budget."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise Rejected(f"{what}: no time left to read a price for market protection")
        with self.http.bounded(left):
            return self._call(what, fn, *args)

    def learn_freeze(self, exchange: str, symbol: str) -> Optional[int]:
        """The freeze quantity of a symbol the symbol file gives none for (Noren's files have no such column):
        GetSecurityInfo's frzqty, kept in the instrument master for the day. None when the broker has none."""
        inst = self.instruments.get(exchange, symbol)
        if inst is None or inst.freeze_qty is not None or (exchange, symbol) in self._no_freeze:
            return inst.freeze_qty if inst is not None else None
        info = self._call("get_security_info", self.api.get_security_info, exchange, inst.token)
        freeze = _int(info.get("frzqty")) if isinstance(info, dict) else 0
        if not freeze:
            self._no_freeze.add((exchange, symbol))
            return None
        self.instruments.by_symbol[(exchange, symbol)] = replace(inst, freeze_qty=freeze)
        self.instruments.by_token[(exchange, inst.token)] = self.instruments.by_symbol[(exchange, symbol)]
        return freeze

    def _look_up(self, exchange: str, symbol: str, deadline: float) -> Instrument:
        """An instrument missing from the symbol file: its token from SearchScrip, its tick and lot from the answer
        or GetSecurityInfo; remembered for the day."""
        where = f"{exchange}:{symbol}"
        try:
            reply = self._lookup(deadline, "searchscrip", self.api.searchscrip, exchange, symbol)
        except Rejected as e:
            if "no data" not in str(e).lower():
                raise Rejected(f"SearchScrip for {where} failed ({e}): a market order cannot be protected") from None
            reply = None
        values = reply.get("values") if isinstance(reply, dict) else None
        row = next((v for v in values or [] if isinstance(v, dict) and v.get("tsym") == symbol
                    and v.get("exch", exchange) == exchange and v.get("token")), None)
        if row is None:
            raise Rejected(f"{where} is not in the instrument file and SearchScrip does not know it: a market order "
                           f"cannot be protected")
        token, tick, lot, freeze = str(row["token"]), _positive(row.get("ti")), _int(row.get("ls")), None
        try:
            info = self._lookup(deadline, "get_security_info", self.api.get_security_info, exchange, token)
        except Rejected:  # the token is enough for GetQuotes; the tick falls back below
            info = None
        if isinstance(info, dict):
            tick, lot = _positive(info.get("ti")) or tick, _int(info.get("ls")) or lot
            freeze = _int(info.get("frzqty")) or None
        inst = Instrument(exchange, token, symbol, lot or 1, tick or DEFAULT_TICK, freeze)
        self._found[(exchange, symbol)] = inst
        self._found_by_token[(exchange, token)] = inst
        return inst

    def _quoted_price(self, inst: Instrument, deadline: float) -> tuple[Decimal, Optional[Decimal], Optional[Decimal]]:
        """GetQuotes by token: (lp, lc, uc), or Rejected when the answer is no usable price."""
        where = f"{inst.exchange}:{inst.symbol}"
        reply = self._lookup(deadline, "get_quotes", self.api.get_quotes, inst.exchange, inst.token)
        if not isinstance(reply, dict):
            raise Rejected(f"GetQuotes for {where} answered {reply!r}: a market order cannot be protected")
        named, token = reply.get("tsym"), str(reply.get("token") or "")
        if (named and named != inst.symbol) or (token and token != inst.token):
            raise Rejected(f"GetQuotes for {where} answered for {reply.get('exch')}:{named} (token {token}): a market "
                           f"order cannot be protected")
        self.note_limits(inst.exchange, inst.symbol, reply.get("lc"), reply.get("uc"))
        lower, upper = _positive(reply.get("lc")), _positive(reply.get("uc"))
        lp = _dec(reply.get("lp"))
        if lp is None or lp <= 0:
            raise Rejected(f"{where} has not traded today (GetQuotes lp {reply.get('lp', 'missing')}) and the feed has no "
                           f"price younger than {self.ltp_max_age_s:g} s: a market order cannot be protected; "
                           f"send a limit order")
        if not _inside(lp, lower, upper):
            raise Rejected(f"GetQuotes answered lp {lp} for {where}, outside the day's circuit limits {lower}-{upper} "
                           f"(a quote for another contract?): a market order cannot be protected")
        return lp, lower, upper

    # ---- plumbing ----
    def _note_unknown_products(self, book: str, rows: list[dict]) -> list[dict]:
        """Record the rows whose `prd` is not one of ours; return the others."""
        known, unknown = [], []
        for r in rows:
            (known if r.get("prd") in PRODUCTS else unknown).append(r)
        self.unknown_products[book] = unknown
        for r in unknown:
            key = (str(r.get("exch")), str(r.get("tsym")), str(r.get("prd")))
            if key not in self._unknown_warned:
                self._unknown_warned.add(key)
                log.warning("%s:%s has product %r in the broker's %s (a cover or bracket order, or a product this "
                            "host does not trade): shown as the broker has it, left out of the strategies' positions "
                            "and the risk PnL", key[0], key[1], key[2], book)
        return known

    def _list(self, what: str, fn: Callable[[], Any]) -> list[dict]:
        """A list route: a list, or [] for Noren's 'no data'; any other answer is an error, never 'empty'."""
        try:
            reply = self._call(what, fn)
        except Rejected as e:
            if "no data" in str(e).lower():
                return []
            raise BrokerError(f"{what} failed: {e}") from None
        if not isinstance(reply, list):
            raise BrokerError(f"{what} answered {reply!r}, not a list")
        return reply

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call the library; turn None, timeouts and odd replies into classified errors."""
        generation = self._token_generation
        try:
            result = fn(*args)
        except requests.exceptions.RequestException as e:  # unreachable only if it never connected
            raise transport_failure(what, e) from None
        except ValueError:  # the library's json.loads on a reply that is not JSON
            last = self.http.last
            status = last.status_code if last is not None else "?"
            if status == 403:
                raise Forbidden(f"{what}: the broker refused the request with HTTP 403 (is this machine's IP "
                               f"registered with the broker?)") from None
            raise UnknownOutcome(f"{what}: the broker's reply was not JSON (HTTP {status})") from None
        if result is None:
            reply = self._last_json()
            emsg = str(reply.get("emsg", "")) if isinstance(reply, dict) else ""
            if "session expired" in emsg.lower() or "invalid session" in emsg.lower():
                self._expired(generation, emsg)
                raise SessionExpired(RECONNECT_HINT)
            raise Rejected(emsg or f"{what} failed: {reply!r}")
        if isinstance(result, dict) and result.get("stat") == "Not_Ok":
            emsg = str(result.get("emsg", ""))
            if "session expired" in emsg.lower():
                self._expired(generation, emsg)
                raise SessionExpired(RECONNECT_HINT)
            raise Rejected(emsg)
        return result

    def _expired(self, generation: int, emsg: str) -> None:
        """Say the session expired, unless the call was sent with a token that a login has since replaced
        (a late answer to the old token must not undo the new login)."""
        if generation == self._token_generation:
            self.note_session("expired", emsg)

    def _last_json(self) -> Any:
        last = self.http.last
        if last is None:
            return None
        try:
            return json.loads(last.text)
        except ValueError:
            return None
