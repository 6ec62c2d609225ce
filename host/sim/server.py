"""The Noren OMS simulator over the wire: REST (jData/jKey, Bearer, stat/emsg), OAuth, symbol files.

The same matching engine as the paper broker; the real NorenRestApiPy library talks to it unchanged.

Like the real broker, warts included
------------------------------------
- `remarks` is free text: a second PlaceOrder with the same remarks books a second order.
- The book covers one day. `new_day` squares off MIS, cover and bracket positions, empties the order and
  trade books (open DAY orders vanish without an update), carries NRML positions as `cfbuyqty`/`cfsellqty`
  at the previous close (`upldprc`), moves CNC buys to Holdings, ends every API session and leaves every
  contract untraded (GetQuotes `lp` "0.00", previous close in `c`) until its next tick.
- PlaceOrder refuses a quantity above the freeze quantity (`frzqty`) or not a whole number of lots, with
  stat Not_Ok and an emsg, and books an order whose limit price is outside the day's circuit (`lc`/`uc`)
  as REJECTED.
- An order can be booked late (the reply comes only when it is booked), booked with no reply at all (the
  TCP connection is closed without an HTTP answer, then the order is booked), or booked and then the
  connection dropped.
- At most 10 order messages a second reach each exchange segment (SEBI's retail-algo limit, counted per
  calendar second): PlaceOrder, ModifyOrder and CancelOrder all count (the worse reading of the rule), and the
  excess is refused with stat Not_Ok. Orders from the broker's app do not count.
- Orders appear that the host never sent: placed "from the broker's app" with empty remarks, the broker's
  square-off, and the legs of cover (`prd` H) and bracket (`prd` B) orders, which carry their main order's
  remarks.

Test controls: POST /sim/control {"action": ...}
------------------------------------------------
expire_session; reject_next {reason}; partial {max_fill_qty}; delay_next {seconds} (booked at once, answered
late); forbid_next {count, route}; stall_feed {on}; drop_ws; tick {exchange, symbol, ltp};
book_late {seconds, reply: "late"|"none"}; drop_next {count, route}; slow_next {seconds, count, route}; manual_order {exchange, symbol, side, qty,
prctyp, prc, trgprc, prd, blprc, bpprc, remarks}; square_off {products}; new_day {keep_sessions};
quote {exchange, symbol, lc, uc, c, no_trades}; wrong_quote_next {count, lp}; instrument {exchange, symbol,
freeze_qty, lot_size, tick_size}; freeze_inclusive {on}; hide_order {norenordno, on}; ops_limit {per_s} (0: none);
stop_type_changes {on}.
docs/simulator.md has an example of each.
"""
from __future__ import annotations

import hashlib
import io
import json
import secrets
import socket
import threading
import time
import zipfile
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Optional
from urllib.parse import unquote_plus, urlencode

from flask import Flask, Response, redirect, request

from ..instruments import SAMPLE, Instrument, Instruments
from ..models import BrokerOrder, OrderRequest, OrderStatus, OrderType, Product, Side
from .matching import MatchingEngine, SimOrder, SimRejected

SESSION_EXPIRED = "Session Expired :  Invalid Session Key"
DEFAULT_REDIRECT = "http://127.0.0.1:8000/broker/callback"  # a login that does not say where to come back
OPS_LIMIT = 10  # SEBI 2026: order messages a second per exchange segment from a retail algo's API session
ORDER_ROUTES = frozenset({"PlaceOrder", "ModifyOrder", "CancelOrder"})  # what counts towards it
NOREN_STATUS = {OrderStatus.OPEN: "OPEN", OrderStatus.PARTIAL: "OPEN", OrderStatus.FILLED: "COMPLETE",
                OrderStatus.CANCELLED: "CANCELED", OrderStatus.REJECTED: "REJECTED"}
SIDES = {"B": Side.BUY, "S": Side.SELL}
PRODUCT_ALIAS = {"M": "NRML", "I": "MIS", "C": "CNC", "H": "CO", "B": "BO"}
LEG_CODES = {"": "0", "TGT": "1", "SL": "2"}  # snoordt: main order, profit leg, stop-loss leg


@dataclass
class Faults:
    """Test controls: each one is used once, or until cleared."""

    reject_next: Optional[str] = None
    delay_next_s: float = 0.0
    forbid_next: int = 0            # answer a non-JSON 403, as the broker's IP whitelist does
    forbid_route: Optional[str] = None  # only on this route (None: any)
    stall_feed: bool = False        # the feed stops sending without closing
    book_late_s: float = 0.0        # the next PlaceOrder is booked this late...
    book_late_reply: str = "late"   # ...and answered then ("late"), or never: the connection drops at once ("none")
    drop_next: int = 0              # answer these many requests with a dropped connection, after handling them
    drop_route: Optional[str] = "PlaceOrder"  # only on this route (None: any)
    slow_next_s: float = 0.0        # the next request to slow_route is handled, then answered this late
    slow_count: int = 0             # (so are this many in all)
    slow_route: Optional[str] = "GetQuotes"  # (None: any)
    wrong_quote_next: int = 0       # GetQuotes answers another instrument's price
    wrong_quote_lp: str = "24512.35"
    freeze_inclusive: bool = False  # also refuse a quantity equal to the freeze quantity
    hidden: set = field(default_factory=set)  # norenordno left out of OrderBook (the order still works)

    def take_late(self) -> Optional[tuple[float, str]]:
        if not self.book_late_s:
            return None
        late, self.book_late_s = (self.book_late_s, self.book_late_reply), 0.0
        return late


@dataclass
class NorenSim:
    """The simulator's state: the book, the sessions, the OAuth clients and the faults."""

    engine: MatchingEngine = field(default_factory=lambda: MatchingEngine(price_from='POST /sim/control {"action": '
                                                                                   '"tick", ...}'))
    instruments: Instruments = field(default_factory=Instruments.sample)
    client_id: str = "SIM-CLIENT"
    client_secret: str = "sim-secret"
    # the redirect URL registered for the OAuth client; None: the one the login asks for (redirect_uri, sent by a
    # host whose authorize page is on loopback), else DEFAULT_REDIRECT
    redirect_url: Optional[str] = None
    faults: Faults = field(default_factory=Faults)
    sessions: dict = field(default_factory=dict)   # token -> uid
    codes: dict = field(default_factory=dict)      # OAuth code -> client id
    amo_orders: set = field(default_factory=set)   # norenordno of orders placed with amo "YES" (after-market)
    quotes: dict = field(default_factory=dict)     # (exchange, symbol) -> {"lc", "uc", "c", ...} as Decimal
    ws_hooks: list = field(default_factory=list)   # callbacks for the WebSocket side (drop, etc.)
    tick_hooks: list = field(default_factory=list)  # called with (exchange, symbol, ltp) on every price move
    timers: list = field(default_factory=list)     # late bookings still to come
    lock: threading.Lock = field(default_factory=threading.Lock)
    ops_limit: int = OPS_LIMIT  # order messages a second per exchange segment; more are refused (0: no limit)
    ops: dict = field(default_factory=dict)  # exchange -> (the calendar second, order messages in it)

    def new_session(self, uid: str) -> str:
        token = secrets.token_hex(16)
        with self.lock:
            self.sessions[token] = uid
        return token

    def tick(self, exchange: str, symbol: str, ltp: Decimal) -> None:
        """Move the market: fill what the price crosses, and push the tick to the feed."""
        self.engine.set_ltp(exchange, symbol, ltp)
        for hook in list(self.tick_hooks):
            hook(exchange, symbol, ltp)

    def over_rate(self, exchange: str) -> Optional[str]:
        """Count one order message to this segment in this calendar second; why it is refused if over the limit."""
        if not self.ops_limit:
            return None
        second = int(time.time())
        with self.lock:
            at, n = self.ops.get(exchange, (second, 0))
            n = n + 1 if at == second else 1
            self.ops[exchange] = (second, n)
        if n <= self.ops_limit:
            return None
        return (f"Rejected : order rate limit exceeded: at most {self.ops_limit} orders, modifications and "
                f"cancellations a second to {exchange or 'this segment'}")

    def expire_sessions(self) -> None:
        with self.lock:
            self.sessions.clear()

    def uid_for(self, token: Optional[str]) -> Optional[str]:
        with self.lock:
            return self.sessions.get(token or "")

    def later(self, delay_s: float, fn: Callable[[], Any]) -> None:
        """Run fn after delay_s on a daemon timer; cancel_timers() stops those not yet run."""
        t = threading.Timer(delay_s, fn)
        t.daemon = True
        with self.lock:
            self.timers = [x for x in self.timers if x.is_alive()] + [t]
        t.start()

    def cancel_timers(self) -> None:
        with self.lock:
            timers, self.timers = self.timers, []
        for t in timers:
            t.cancel()

    def set_instrument(self, exchange: str, symbol: str, **changes: Any) -> Instrument:
        inst = self.instruments.get(exchange, symbol)
        if inst is None:
            raise KeyError(f"no instrument {exchange}:{symbol}")
        items = dict(self.instruments.by_symbol)
        items[(exchange, symbol)] = replace(inst, **changes)
        self.instruments = Instruments(items.values())
        return items[(exchange, symbol)]

    def new_day(self) -> None:
        """Roll the engine to the next day; its last prices become the previous closes (`c`)."""
        for key, close in self.engine.new_day().items():
            self.quotes.setdefault(key, {})["c"] = close


def _ok(**fields: Any) -> Response:
    return _json({"stat": "Ok", "request_time": time.strftime("%H:%M:%S %d-%m-%Y"), **fields})


def _not_ok(emsg: str) -> Response:
    return _json({"stat": "Not_Ok", "request_time": time.strftime("%H:%M:%S %d-%m-%Y"), "emsg": emsg})


def _json(value: Any) -> Response:
    return Response(json.dumps(value), mimetype="application/json")


def _drop() -> Response:
    """No HTTP answer at all: the TCP connection is closed after the request was read.

    The client sees the connection end before any status line (requests: ConnectionError, RemoteDisconnected).
    The body raises a ConnectionError, which werkzeug takes for a dropped connection: it writes nothing."""
    sock = request.environ.get("werkzeug.socket")

    def body():
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        raise ConnectionAbortedError("the simulator dropped the connection")
        yield b""  # pragma: no cover - makes this a generator

    return Response(body(), mimetype="application/json")


def _d(v: Any) -> Optional[Decimal]:
    try:
        d = Decimal(str(v))
    except (InvalidOperation, TypeError):
        return None
    return d if d.is_finite() and d > 0 else None


def _px(v: Optional[Decimal]) -> str:
    """A price or amount as Noren writes it: two decimals, or more when the tick needs them ("0.00" for none)."""
    v = Decimal("0") if v is None else v
    return f"{v.quantize(Decimal('0.01')):f}" if v.as_tuple().exponent >= -2 else str(v)


def _stamp(sim: NorenSim) -> str:
    return time.strftime("%H:%M:%S ") + sim.engine.day.strftime("%d-%m-%Y")


def noren_order(sim: NorenSim, o: SimOrder, uid: str = "") -> dict:
    """One order as Noren's order book shows it."""
    r, view = o.req, o.view()
    inst = sim.instruments.get(r.exchange, r.symbol)
    status = NOREN_STATUS[o.status]
    if o.status is OrderStatus.OPEN and r.order_type.needs_trigger and not o.triggered:
        status = "TRIGGER_PENDING"
    prd = o.product_code
    out = {"stat": "Ok", "norenordno": o.broker_order_id, "uid": uid, "actid": uid, "exch": r.exchange,
           "tsym": r.symbol, "token": inst.token if inst else "", "qty": str(r.qty), "prc": str(r.price or "0.00"),
           "prctyp": r.order_type.value, "trantype": "B" if r.side is Side.BUY else "S", "prd": prd,
           "s_prdt_ali": PRODUCT_ALIAS.get(prd, prd), "ret": "DAY", "status": status,
           "fillshares": str(o.filled_qty), "remarks": r.remarks, "norentm": _stamp(sim),
           "ls": str(inst.lot_size if inst else 1), "ti": str(inst.tick_size if inst else "0.05")}
    if r.trigger_price is not None:
        out["trgprc"] = str(r.trigger_price)
    if view.avg_price is not None:
        out["avgprc"] = str(view.avg_price)
    if o.reason and o.status is OrderStatus.REJECTED:
        out["rejreason"] = o.reason
    if o.prd in ("H", "B"):
        out["snoordt"] = LEG_CODES[o.leg]
        if o.parent:
            out["snonum"] = o.parent
        stop, target = o.offsets
        out.update({k: str(v) for k, v in (("blprc", stop), ("bpprc", target)) if v is not None})
    return out


def order_update(sim: NorenSim, update: BrokerOrder) -> dict:
    """An `om` message for one order change; a fill carries its fill id, quantity and price."""
    o = sim.engine.get(update.broker_order_id)
    msg = {"t": "om", **{k: v for k, v in noren_order(sim, o).items() if k != "stat"}}
    msg["reporttype"] = {"COMPLETE": "Fill", "REJECTED": "Rejected", "CANCELED": "Canceled"}.get(msg["status"], "NewAck")
    if o.fills and msg["status"] in ("OPEN", "COMPLETE") and int(msg["fillshares"]):
        last = o.fills[-1]
        msg.update(reporttype="Fill", flid=last.fill_id, flqty=str(last.qty), flprc=str(last.price))
    return msg


def quote_fields(sim: NorenSim, inst: Instrument) -> dict:
    """What GetQuotes (and the feed's touchline acknowledgement) says of a contract: lp "0.00" when it has
    not traded today, and the day's circuit limits and previous close when they are known."""
    ltp = sim.engine.ltp(inst.exchange, inst.symbol)
    known = sim.quotes.get((inst.exchange, inst.symbol), {})
    return {"exch": inst.exchange, "tsym": inst.symbol, "token": inst.token, "ls": str(inst.lot_size),
            "ti": str(inst.tick_size), "pp": "2", "lp": _px(ltp), **{k: _px(v) for k, v in known.items()}}


def create_sim_app(sim: NorenSim) -> Flask:
    """The REST side of the simulator; routes are matched on the last path segment."""
    app = Flask("noren-sim")

    def body() -> tuple[dict, Optional[str]]:
        raw = request.get_data(as_text=True)
        form = {}
        for part in raw.split("&"):
            if "=" in part:
                k, v = part.split("=", 1)
                form[k] = v
        try:
            data = json.loads(form.get("jData", "{}") or "{}")
        except ValueError:
            data = None
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else form.get("jKey")
        return data, token

    @app.get("/authorize")
    def authorize():
        """The OAuth page: in the simulator it approves at once and redirects back with a code."""
        if request.args.get("client_id") != sim.client_id:
            return Response("unknown client_id", status=400)
        code = secrets.token_hex(8)
        sim.codes[code] = request.args["client_id"]
        asked = request.args.get("redirect_uri")
        if asked and sim.redirect_url and asked != sim.redirect_url:
            return Response(f"redirect_uri {asked} is not the redirect URL registered for this client "
                            f"({sim.redirect_url}): start the simulator without --redirect-url, or open the "
                            f"dashboard at that address", status=400, mimetype="text/plain")
        target = asked or sim.redirect_url or DEFAULT_REDIRECT
        params = {"code": code, **({"state": request.args["state"]} if request.args.get("state") else {})}
        return redirect(f"{target}{'&' if '?' in target else '?'}{urlencode(params)}")

    @app.get("/<exch>_symbols.txt.zip")
    def symbols(exch: str):
        lines = [line for line in SAMPLE.read_text().splitlines()]
        text = "\n".join([lines[0]] + [line for line in lines[1:] if line.startswith(exch + ",")]) + "\n"
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(f"{exch}_symbols.txt", text)
        return Response(buf.getvalue(), mimetype="application/zip")

    @app.post("/sim/control")
    def control():
        """Test controls; the module docstring and docs/simulator.md list them."""
        c = request.get_json(force=True)
        action = CONTROLS.get(c.get("action"))
        if action is None:
            return _json({"ok": False, "error": f"unknown action {c.get('action')!r}"}), 400
        try:
            extra = action(sim, c) or {}
        except (SimRejected, KeyError, ValueError, InvalidOperation) as e:
            return _json({"ok": False, "error": str(e)}), 400
        return _json({"ok": True, **extra})

    @app.route("/<path:route>", methods=["POST"])
    def api(route: str):
        name = route.rstrip("/").split("/")[-1]
        if sim.faults.forbid_next > 0 and sim.faults.forbid_route in (None, name):
            sim.faults.forbid_next -= 1
            return Response("<html><body><h1>403 Forbidden</h1>IP not whitelisted</body></html>", status=403,
                            mimetype="text/html")
        data, token = body()
        if data is None:
            return _not_ok("Invalid Input : jData is not valid JSON")
        handler = ROUTES.get(name)
        if handler is None:
            return _not_ok(f"Invalid route {name}")
        if name == "GenAcsTok":
            return handler(sim, data, "")
        uid = sim.uid_for(token)
        if uid is None:
            return _not_ok(SESSION_EXPIRED)
        if name in ORDER_ROUTES:
            refused = sim.over_rate(_segment(sim, name, data))
            if refused:
                return _not_ok(refused)
        answer = handler(sim, data, uid)
        if sim.faults.slow_next_s and sim.faults.slow_count > 0 and sim.faults.slow_route in (None, name):
            slow = sim.faults.slow_next_s
            sim.faults.slow_count -= 1
            time.sleep(slow)
        if sim.faults.drop_next > 0 and sim.faults.drop_route in (None, name):
            sim.faults.drop_next -= 1
            return _drop()  # handled (for PlaceOrder: booked), but the answer never leaves
        return answer

    return app


def _segment(sim: NorenSim, route: str, data: dict) -> str:
    """The exchange segment an order message goes to: its own for PlaceOrder, its order's otherwise."""
    if route == "PlaceOrder":
        return str(data.get("exch", ""))
    o = sim.engine.get(str(data.get("norenordno", "")))
    return o.req.exchange if o is not None else str(data.get("exch", ""))


# ---- route handlers: (sim, jData, uid) -> Response ----

def gen_acs_tok(sim: NorenSim, data: dict, uid: str) -> Response:
    code, client = data.get("code", ""), sim.codes.pop(data.get("code", ""), None)
    expected = hashlib.sha256((sim.client_id + sim.client_secret + code).encode()).hexdigest()
    if client is None or data.get("checksum") != expected:
        return _not_ok("Invalid code or checksum")
    user = data.get("uid") or "SIMUSER"
    token = sim.new_session(user)
    return _json({"stat": "Ok", "access_token": token, "USERID": user, "refresh_token": secrets.token_hex(8),
                  "actid": user, "susertoken": token})


def quick_auth(sim: NorenSim, data: dict, uid: str) -> Response:
    return _ok(susertoken=sim.new_session(data.get("uid", uid)))


def logout(sim: NorenSim, data: dict, uid: str) -> Response:
    return _ok()


@dataclass(frozen=True)
class Ticket:
    """A PlaceOrder request that passed the order-entry checks."""

    req: OrderRequest
    prd: Optional[str]                 # "H"/"B"; None for M/I/C
    offsets: tuple[Optional[Decimal], Optional[Decimal]]


def _quantity_problem(sim: NorenSim, inst: Instrument, qty: int) -> Optional[str]:
    if qty % inst.lot_size:
        return f"Invalid Input : Quantity {qty} should be multiple of lot size {inst.lot_size}"
    frz = inst.freeze_qty
    if frz and (qty > frz or (sim.faults.freeze_inclusive and qty == frz)):
        return (f"RMS:Rule: Check order quantity for {inst.exchange}:{inst.symbol}, order quantity {qty} "
                f"exceeds freeze quantity {frz}")
    return None


def _ticket(sim: NorenSim, data: dict) -> Ticket:
    """Order entry, as Noren checks it before booking; a refusal raises SimRejected with Noren's emsg."""
    side = SIDES.get(data.get("trantype"))
    prd, prctyp = data.get("prd"), data.get("prctyp")
    try:
        otype = OrderType(prctyp)
    except ValueError:
        raise SimRejected(f"Invalid Input : prctyp {prctyp!r}") from None
    if prd not in PRODUCT_ALIAS:
        raise SimRejected(f"Invalid Input : prd {prd!r}")
    try:
        qty = int(data.get("qty", "0"))
    except (TypeError, ValueError):
        qty = 0
    problems = [name for name, bad in (("trantype", side is None), ("qty", qty <= 0)) if bad]
    price, trigger = _d(data.get("prc")), _d(data.get("trgprc"))
    if otype.needs_price and price is None:
        problems.append("prc")
    if otype.needs_trigger and trigger is None:
        problems.append("trgprc")
    stop, target = _d(data.get("blprc")), _d(data.get("bpprc"))
    if prd in ("H", "B") and stop is None:
        problems.append("blprc")
    if prd == "B" and target is None:
        problems.append("bpprc")
    if problems:
        raise SimRejected("Invalid Input : " + ", ".join(problems))
    symbol, exch = unquote_plus(data.get("tsym", "")), data.get("exch", "")
    inst = sim.instruments.get(exch, symbol)
    if inst is None:
        raise SimRejected(f"Invalid Input : Invalid Trading Symbol {symbol}")
    problem = _quantity_problem(sim, inst, qty)
    if problem:
        raise SimRejected(problem)
    product = Product.MIS if prd in ("H", "B") else Product(prd)
    req = OrderRequest(exch, symbol, side, qty, otype, product, price if otype.needs_price else None,
                       trigger if otype.needs_trigger else None, remarks=data.get("remarks") or "")
    return Ticket(req, prd if prd in ("H", "B") else None, (stop, target))


def _circuit_problem(sim: NorenSim, req: OrderRequest) -> Optional[str]:
    known = sim.quotes.get((req.exchange, req.symbol), {})
    lc, uc = known.get("lc"), known.get("uc")
    for name, price in (("price", req.price), ("trigger price", req.trigger_price)):
        if price is not None and ((lc is not None and price < lc) or (uc is not None and price > uc)):
            return f"RMS:Rule: Order {name} {price} is out of the day's price range {_px(lc)} - {_px(uc)}"
    return None


def _book(sim: NorenSim, t: Ticket, faults: bool = True) -> str:
    """Book a checked order: REJECTED (with an order number) when the broker's RMS or the exchange refuses it."""
    refusal = None
    if faults and sim.faults.reject_next:
        refusal, sim.faults.reject_next = sim.faults.reject_next, None
    refusal = refusal or _circuit_problem(sim, t.req)
    if refusal is None:
        try:
            return sim.engine.place(t.req, prd=t.prd, offsets=t.offsets)
        except SimRejected as e:
            refusal = str(e)
    return sim.engine.record_rejected(t.req, refusal, prd=t.prd)


def _api_market(otype: OrderType) -> Optional[str]:
    """Why the API refuses an order type: a market order must carry price protection there (the broker's app
    protects its own)."""
    if otype in (OrderType.MKT, OrderType.SL_MKT):
        return (f"Invalid Input : {otype.value} orders without market protection are not accepted through the API: "
                f"send MKT as LMT and SL-MKT as SL-LMT")
    return None


def place_order(sim: NorenSim, data: dict, uid: str) -> Response:
    try:
        ticket = _ticket(sim, data)
    except SimRejected as e:
        return _not_ok(str(e))
    refused = _api_market(ticket.req.order_type)
    if refused:
        return _not_ok(refused)
    late = sim.faults.take_late()
    if late is not None:
        delay, reply = late
        if reply == "none":  # the connection drops now; the order is booked later all the same
            sim.later(delay, lambda: _book(sim, ticket))
            return _drop()
        time.sleep(delay)  # nothing is booked yet: the book does not know the order until the answer leaves
    oid = _book(sim, ticket)
    if data.get("amo") == "YES":
        sim.amo_orders.add(oid)
    if sim.faults.delay_next_s:
        delay, sim.faults.delay_next_s = sim.faults.delay_next_s, 0.0
        time.sleep(delay)  # the order is placed; only the answer is late
    return _ok(norenordno=oid)


def _on_order(act: Callable[[MatchingEngine, str], Any]) -> Callable[[NorenSim, dict, str], Response]:
    """A route that acts on one order by its norenordno (CancelOrder, ExitSNOOrder)."""
    def handler(sim: NorenSim, data: dict, uid: str) -> Response:
        try:
            act(sim.engine, data.get("norenordno", ""))
        except SimRejected as e:
            return _not_ok(str(e))
        return _ok(result=data.get("norenordno"))
    return handler


cancel_order = _on_order(MatchingEngine.cancel)
exit_sno_order = _on_order(MatchingEngine.exit_legs)  # a cover/bracket order: cancel the target, close at market


def modify_order(sim: NorenSim, data: dict, uid: str) -> Response:
    try:
        otype = OrderType(data.get("prctyp"))
        qty = int(data.get("qty", "0"))
    except ValueError:
        return _not_ok(f"Invalid Input : prctyp {data.get('prctyp')!r} or qty {data.get('qty')!r}")
    if _api_market(otype):
        return _not_ok(_api_market(otype))
    o = sim.engine.get(data.get("norenordno", ""))
    inst = sim.instruments.get(o.req.exchange, o.req.symbol) if o else None
    price, trigger = _d(data.get("prc")) if otype.needs_price else None, _d(data.get("trgprc")) if \
        otype.needs_trigger else None
    problem = (_quantity_problem(sim, inst, qty) if inst else None) or \
        (_circuit_problem(sim, replace(o.req, price=price, trigger_price=trigger)) if o else None)
    if problem:
        return _not_ok(problem)
    try:
        sim.engine.modify(data.get("norenordno", ""), qty, otype, price, trigger)
    except SimRejected as e:
        return _not_ok(str(e))
    return _ok(result=data.get("norenordno"))


def _list(items: list) -> Response:
    return _json(items) if items else _not_ok("no data")


def order_book(sim: NorenSim, data: dict, uid: str) -> Response:
    orders = sorted((o for o in sim.engine.order_book() if o.broker_order_id not in sim.faults.hidden),
                    key=lambda o: o.broker_order_id, reverse=True)
    return _list([noren_order(sim, sim.engine.get(o.broker_order_id), uid) for o in orders])


def single_order_history(sim: NorenSim, data: dict, uid: str) -> Response:
    o = sim.engine.get(data.get("norenordno", ""))
    return _list([noren_order(sim, o, uid)] if o else [])


def trade_book(sim: NorenSim, data: dict, uid: str) -> Response:
    out = []
    for view in sim.engine.order_book():
        o = sim.engine.get(view.broker_order_id)
        row = noren_order(sim, o, uid)
        for f in o.fills:
            out.append({**{k: row[k] for k in ("stat", "norenordno", "uid", "actid", "exch", "tsym", "token",
                                               "trantype", "prd", "s_prdt_ali", "prctyp", "qty", "remarks",
                                               "ls", "ti")},
                        "flid": f.fill_id, "flqty": str(f.qty), "flprc": str(f.price), "fillshares": str(o.filled_qty),
                        "fltm": sim.engine.day.strftime("%d-%m-%Y ") + time.strftime("%H:%M:%S")})
    return _list(out)


def _avg(amount: Decimal, qty: int) -> str:
    return _px(amount / qty if qty else None)


def position_book(sim: NorenSim, data: dict, uid: str) -> Response:
    """Noren's PositionBook: carried (cf*), today's (day*) and total (tot*) buys and sells, and the net."""
    out = []
    for (ex, sym, prd), p in sim.engine.position_book().items():
        inst = sim.instruments.get(ex, sym)
        ltp = sim.engine.ltp(ex, sym)
        cf_buy, cf_sell = max(p.cf_qty, 0), max(-p.cf_qty, 0)
        cf_buy_amt, cf_sell_amt = cf_buy * p.cf_price, cf_sell * p.cf_price
        tot_buy, tot_sell = cf_buy + p.day_buy_qty, cf_sell + p.day_sell_qty
        m = p.math
        out.append({"stat": "Ok", "uid": uid, "actid": uid, "exch": ex, "tsym": sym, "token": inst.token if inst else "",
                    "prd": prd, "s_prdt_ali": PRODUCT_ALIAS.get(prd, prd), "netqty": str(m.net_qty),
                    "netavgprc": str(m.avg_price), "netupldprc": _px(m.avg_price),
                    "upldprc": _px(p.cf_price if p.cf_qty else None),
                    "cfbuyqty": str(cf_buy), "cfsellqty": str(cf_sell), "cfbuyamt": _px(cf_buy_amt),
                    "cfsellamt": _px(cf_sell_amt), "cfbuyavgprc": _avg(cf_buy_amt, cf_buy),
                    "cfsellavgprc": _avg(cf_sell_amt, cf_sell),
                    "daybuyqty": str(p.day_buy_qty), "daysellqty": str(p.day_sell_qty),
                    "daybuyamt": _px(p.day_buy_amt), "daysellamt": _px(p.day_sell_amt),
                    "daybuyavgprc": _avg(p.day_buy_amt, p.day_buy_qty), "daysellavgprc": _avg(p.day_sell_amt, p.day_sell_qty),
                    "totbuyamt": _px(cf_buy_amt + p.day_buy_amt), "totsellamt": _px(cf_sell_amt + p.day_sell_amt),
                    "totbuyavgprc": _avg(cf_buy_amt + p.day_buy_amt, tot_buy),
                    "totsellavgprc": _avg(cf_sell_amt + p.day_sell_amt, tot_sell),
                    "rpnl": str(m.realized_pnl), "urmtom": str(m.unrealized(ltp)), "lp": str(ltp or Decimal("0")),
                    "ls": str(inst.lot_size if inst else 1), "ti": str(inst.tick_size if inst else "0.05"),
                    "mult": "1", "prcftr": "1.000000", "pp": "2"})
    return _list(out)


def holdings(sim: NorenSim, data: dict, uid: str) -> Response:
    out = []
    for (ex, sym), (qty, avg) in sim.engine.holdings.items():
        inst = sim.instruments.get(ex, sym)
        out.append({"stat": "Ok", "exch_tsym": [{"exch": ex, "tsym": sym, "token": inst.token if inst else "",
                                                 "pp": "2", "ls": "1", "ti": str(inst.tick_size if inst else "0.05")}],
                    "holdqty": str(qty), "btstqty": "0", "usedqty": "0", "upldprc": _px(avg)})
    return _list(out)


def limits(sim: NorenSim, data: dict, uid: str) -> Response:
    return _ok(actid=uid, prfname="SIM", cash="1000000.00", payin="0.00", marginused="0.00")


def search_scrip(sim: NorenSim, data: dict, uid: str) -> Response:
    text = unquote_plus(data.get("stext", "")).upper()
    values = [{"exch": i.exchange, "token": i.token, "tsym": i.symbol, "ls": str(i.lot_size), "ti": str(i.tick_size)}
              for i in sim.instruments.by_symbol.values() if i.exchange == data.get("exch") and text in i.symbol]
    return _ok(values=values) if values else _not_ok("no data")


def _instrument(sim: NorenSim, data: dict) -> Optional[Instrument]:
    return sim.instruments.token(data.get("exch", ""), str(data.get("token", "")))


def security_info(sim: NorenSim, data: dict, uid: str) -> Response:
    inst = _instrument(sim, data)
    if inst is None:
        return _not_ok("no data")
    extra = {"frzqty": str(inst.freeze_qty)} if inst.freeze_qty else {}  # unknown: absent, never a guess
    return _ok(exch=inst.exchange, tsym=inst.symbol, token=inst.token, ls=str(inst.lot_size), ti=str(inst.tick_size),
               pp="2", mult="1", prcftr="1.000000", **extra)


def get_quotes(sim: NorenSim, data: dict, uid: str) -> Response:
    inst = _instrument(sim, data)
    if inst is None:
        return _not_ok("no data")
    fields = quote_fields(sim, inst)
    if sim.faults.wrong_quote_next > 0:  # the answer names this contract, with another contract's price
        sim.faults.wrong_quote_next -= 1
        fields["lp"] = sim.faults.wrong_quote_lp
    return _ok(**fields)


ROUTES: dict[str, Callable[[NorenSim, dict, str], Response]] = {
    "QuickAuth": quick_auth, "GenAcsTok": gen_acs_tok, "Logout": logout, "PlaceOrder": place_order,
    "ModifyOrder": modify_order, "CancelOrder": cancel_order, "ExitSNOOrder": exit_sno_order,
    "OrderBook": order_book, "SingleOrdHist": single_order_history, "TradeBook": trade_book,
    "PositionBook": position_book, "Holdings": holdings, "Limits": limits, "SearchScrip": search_scrip,
    "GetQuotes": get_quotes, "GetSecurityInfo": security_info,
}


# ---- /sim/control actions: (sim, body) -> extra fields of the answer ----

def _manual_order(sim: NorenSim, c: dict) -> dict:
    """An order the trader places in the broker's app: no remarks of ours (unless given), same checks."""
    side = str(c.get("side", "B")).upper()
    data = {"exch": c["exchange"], "tsym": c["symbol"], "trantype": {"BUY": "B", "SELL": "S"}.get(side, side),
            "qty": c.get("qty", 0), "prctyp": c.get("prctyp", "MKT"), "prd": c.get("prd", "M"),
            "remarks": c.get("remarks", ""), **{k: c.get(k) for k in ("prc", "trgprc", "blprc", "bpprc")}}
    return {"norenordno": _book(sim, _ticket(sim, data), faults=False)}


def _quote(sim: NorenSim, c: dict) -> None:
    key = (c["exchange"], c["symbol"])
    known = sim.quotes.setdefault(key, {})
    for k in ("lc", "uc", "c", "o", "h", "l"):
        if k in c:
            if c[k] is None:
                known.pop(k, None)
            else:
                known[k] = Decimal(str(c[k]))
    if c.get("no_trades"):
        sim.engine.forget_ltp(*key)


def _set_fault(**fields: Callable[[dict], Any]) -> Callable[[NorenSim, dict], None]:
    def action(sim: NorenSim, c: dict) -> None:
        for name, read in fields.items():
            setattr(sim.faults, name, read(c))
    return action


def _new_day(sim: NorenSim, c: dict) -> None:
    sim.new_day()
    if not c.get("keep_sessions"):
        sim.expire_sessions()  # API sessions end before each trading day


def _instrument_change(sim: NorenSim, c: dict) -> dict:
    names = {"freeze_qty": int, "lot_size": int, "tick_size": lambda v: Decimal(str(v))}
    changes = {k: (None if c[k] is None else conv(c[k])) for k, conv in names.items() if k in c}
    inst = sim.set_instrument(c["exchange"], c["symbol"], **changes)
    return {"freeze_qty": inst.freeze_qty, "lot_size": inst.lot_size, "tick_size": str(inst.tick_size)}


def _drop_ws(sim: NorenSim, c: dict) -> None:
    for hook in list(sim.ws_hooks):
        hook("drop")


def _hide_order(sim: NorenSim, c: dict) -> None:
    """OrderBook leaves the order out (or shows it again), while it goes on working at the exchange."""
    (sim.faults.hidden.add if c.get("on", True) else sim.faults.hidden.discard)(str(c["norenordno"]))


CONTROLS: dict[str, Callable[[NorenSim, dict], Optional[dict]]] = {
    "expire_session": lambda sim, c: sim.expire_sessions(),
    "reject_next": _set_fault(reject_next=lambda c: c.get("reason", "RMS:Rejected by the simulator")),
    "partial": lambda sim, c: setattr(sim.engine, "max_fill_qty", c.get("max_fill_qty")),
    "delay_next": _set_fault(delay_next_s=lambda c: float(c.get("seconds", 0))),
    "forbid_next": _set_fault(forbid_next=lambda c: int(c.get("count", 1)), forbid_route=lambda c: c.get("route")),
    "stall_feed": _set_fault(stall_feed=lambda c: bool(c.get("on", True))),
    "drop_ws": _drop_ws,
    "tick": lambda sim, c: sim.tick(c["exchange"], c["symbol"], Decimal(str(c["ltp"]))),
    "book_late": _set_fault(book_late_s=lambda c: float(c.get("seconds", 3)),
                            book_late_reply=lambda c: "none" if c.get("reply") == "none" else "late"),
    "drop_next": _set_fault(drop_next=lambda c: int(c.get("count", 1)),
                            drop_route=lambda c: c.get("route", "PlaceOrder")),
    "slow_next": _set_fault(slow_next_s=lambda c: float(c.get("seconds", 1)),
                            slow_count=lambda c: int(c.get("count", 1)),
                            slow_route=lambda c: c.get("route", "GetQuotes")),
    "manual_order": _manual_order,
    "square_off": lambda sim, c: {"orders": sim.engine.square_off(tuple(c.get("products", ("I", "H", "B"))))},
    "new_day": _new_day,
    "quote": _quote,
    "wrong_quote_next": _set_fault(wrong_quote_next=lambda c: int(c.get("count", 1)),
                                   wrong_quote_lp=lambda c: str(c.get("lp", "24512.35"))),
    "instrument": _instrument_change,
    "freeze_inclusive": _set_fault(freeze_inclusive=lambda c: bool(c.get("on", True))),
    "hide_order": _hide_order,
    "ops_limit": lambda sim, c: setattr(sim, "ops_limit", max(0, int(c.get("per_s", OPS_LIMIT)))),
    "stop_type_changes": lambda sim, c: setattr(sim.engine, "stop_type_changes", bool(c.get("on", True))),
}
