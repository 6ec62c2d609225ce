"""The Noren OMS simulator over the wire: REST (jData/jKey, Bearer, stat/emsg), OAuth, symbol files.

The same matching engine as the paper broker; the real NorenRestApiPy library talks to it unchanged.
"""
from __future__ import annotations

import hashlib
import io
import json
import secrets
import threading
import time
import zipfile
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Optional
from urllib.parse import unquote_plus, urlencode

from flask import Flask, Response, redirect, request

from ..instruments import SAMPLE, Instruments
from ..models import BrokerOrder, OrderRequest, OrderStatus, OrderType, Product, Side
from .matching import MatchingEngine, SimOrder, SimRejected

SESSION_EXPIRED = "Session Expired :  Invalid Session Key"
NOREN_STATUS = {OrderStatus.OPEN: "OPEN", OrderStatus.PARTIAL: "OPEN", OrderStatus.FILLED: "COMPLETE",
                OrderStatus.CANCELLED: "CANCELED", OrderStatus.REJECTED: "REJECTED"}
SIDES = {"B": Side.BUY, "S": Side.SELL}


@dataclass
class Faults:
    """Test controls: each one is used once, or until cleared."""

    reject_next: Optional[str] = None
    delay_next_s: float = 0.0
    forbid_next: int = 0            # answer a non-JSON 403, as the broker's IP whitelist does
    forbid_route: Optional[str] = None  # only on this route (None: any)
    stall_feed: bool = False        # the feed stops sending without closing


@dataclass
class NorenSim:
    """The simulator's state: the book, the sessions, the OAuth clients and the faults."""

    engine: MatchingEngine = field(default_factory=MatchingEngine)
    instruments: Instruments = field(default_factory=Instruments.sample)
    client_id: str = "SIM-CLIENT"
    client_secret: str = "sim-secret"
    redirect_url: str = "http://127.0.0.1:8000/broker/callback"
    faults: Faults = field(default_factory=Faults)
    sessions: dict = field(default_factory=dict)   # token -> uid
    codes: dict = field(default_factory=dict)      # OAuth code -> client id
    ws_hooks: list = field(default_factory=list)   # callbacks for the WebSocket side (drop, etc.)
    tick_hooks: list = field(default_factory=list)  # called with (exchange, symbol, ltp) on every price move
    lock: threading.Lock = field(default_factory=threading.Lock)

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

    def expire_sessions(self) -> None:
        with self.lock:
            self.sessions.clear()

    def uid_for(self, token: Optional[str]) -> Optional[str]:
        with self.lock:
            return self.sessions.get(token or "")


def _ok(**fields: Any) -> Response:
    return _json({"stat": "Ok", "request_time": time.strftime("%H:%M:%S %d-%m-%Y"), **fields})


def _not_ok(emsg: str) -> Response:
    return _json({"stat": "Not_Ok", "request_time": time.strftime("%H:%M:%S %d-%m-%Y"), "emsg": emsg})


def _json(value: Any) -> Response:
    return Response(json.dumps(value), mimetype="application/json")


def _d(v: Any) -> Optional[Decimal]:
    try:
        d = Decimal(str(v))
    except (InvalidOperation, TypeError):
        return None
    return d if d.is_finite() and d > 0 else None


def noren_order(sim: NorenSim, o: SimOrder, uid: str = "") -> dict:
    """One order as Noren's order book shows it."""
    r, view = o.req, o.view()
    inst = sim.instruments.get(r.exchange, r.symbol)
    status = NOREN_STATUS[o.status]
    if o.status is OrderStatus.OPEN and r.order_type.needs_trigger and not o.triggered:
        status = "TRIGGER_PENDING"
    out = {"stat": "Ok", "norenordno": o.broker_order_id, "uid": uid, "actid": uid, "exch": r.exchange,
           "tsym": r.symbol, "token": inst.token if inst else "", "qty": str(r.qty), "prc": str(r.price or "0.00"),
           "prctyp": r.order_type.value, "trantype": "B" if r.side is Side.BUY else "S", "prd": r.product.value,
           "ret": "DAY", "status": status, "fillshares": str(o.filled_qty), "remarks": r.remarks,
           "norentm": time.strftime("%H:%M:%S %d-%m-%Y"), "ls": str(inst.lot_size if inst else 1),
           "ti": str(inst.tick_size if inst else "0.05")}
    if r.trigger_price is not None:
        out["trgprc"] = str(r.trigger_price)
    if view.avg_price is not None:
        out["avgprc"] = str(view.avg_price)
    if o.reason and o.status is OrderStatus.REJECTED:
        out["rejreason"] = o.reason
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
        target = request.args.get("redirect_uri") or sim.redirect_url
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
        """Test controls: expire, reject_next, partial, delay_next, forbid_next, drop_ws, stall_feed, tick."""
        c = request.get_json(force=True)
        action = c.get("action")
        if action == "expire_session":
            sim.expire_sessions()
        elif action == "reject_next":
            sim.faults.reject_next = c.get("reason", "RMS:Rejected by the simulator")
        elif action == "partial":
            sim.engine.max_fill_qty = c.get("max_fill_qty")
        elif action == "delay_next":
            sim.faults.delay_next_s = float(c.get("seconds", 0))
        elif action == "forbid_next":
            sim.faults.forbid_next = int(c.get("count", 1))
            sim.faults.forbid_route = c.get("route")
        elif action == "stall_feed":
            sim.faults.stall_feed = bool(c.get("on", True))
        elif action == "drop_ws":
            for hook in list(sim.ws_hooks):
                hook("drop")
        elif action == "tick":
            sim.tick(c["exchange"], c["symbol"], Decimal(str(c["ltp"])))
        else:
            return _json({"ok": False, "error": f"unknown action {action!r}"}), 400
        return _json({"ok": True})

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
        return handler(sim, data, uid)

    return app


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


def place_order(sim: NorenSim, data: dict, uid: str) -> Response:
    problems = []
    side = SIDES.get(data.get("trantype"))
    try:
        otype, product = OrderType(data.get("prctyp")), Product(data.get("prd"))
    except ValueError:
        return _not_ok(f"Invalid Input : prctyp {data.get('prctyp')!r} or prd {data.get('prd')!r}")
    try:
        qty = int(data.get("qty", "0"))
    except ValueError:
        qty = 0
    if side is None:
        problems.append("trantype")
    if qty <= 0:
        problems.append("qty")
    if problems:
        return _not_ok("Invalid Input : " + ", ".join(problems))
    symbol = unquote_plus(data.get("tsym", ""))
    exch = data.get("exch", "")
    inst = sim.instruments.get(exch, symbol)
    if inst is None:
        return _not_ok(f"Invalid Input : Invalid Trading Symbol {symbol}")
    req = OrderRequest(exch, symbol, side, qty, otype, product, _d(data.get("prc")) if otype.needs_price else None,
                       _d(data.get("trgprc")) if otype.needs_trigger else None, remarks=data.get("remarks") or "")
    if sim.faults.reject_next:
        reason, sim.faults.reject_next = sim.faults.reject_next, None
        oid = sim.engine.record_rejected(req, reason)
    else:
        if qty % inst.lot_size:
            oid = sim.engine.record_rejected(req, f"RMS:Quantity {qty} is not a multiple of the lot size {inst.lot_size}")
        else:
            try:
                oid = sim.engine.place(req)
            except SimRejected as e:
                oid = sim.engine.record_rejected(req, str(e))
    if sim.faults.delay_next_s:
        delay, sim.faults.delay_next_s = sim.faults.delay_next_s, 0.0
        time.sleep(delay)  # the order is placed; only the answer is late
    return _ok(norenordno=oid)


def cancel_order(sim: NorenSim, data: dict, uid: str) -> Response:
    try:
        sim.engine.cancel(data.get("norenordno", ""))
    except SimRejected as e:
        return _not_ok(str(e))
    return _ok(result=data.get("norenordno"))


def modify_order(sim: NorenSim, data: dict, uid: str) -> Response:
    try:
        otype = OrderType(data.get("prctyp"))
        qty = int(data.get("qty", "0"))
    except ValueError:
        return _not_ok(f"Invalid Input : prctyp {data.get('prctyp')!r} or qty {data.get('qty')!r}")
    try:
        sim.engine.modify(data.get("norenordno", ""), qty, otype, _d(data.get("prc")) if otype.needs_price else None,
                          _d(data.get("trgprc")) if otype.needs_trigger else None)
    except SimRejected as e:
        return _not_ok(str(e))
    return _ok(result=data.get("norenordno"))


def _list(items: list) -> Response:
    return _json(items) if items else _not_ok("no data")


def order_book(sim: NorenSim, data: dict, uid: str) -> Response:
    orders = sorted(sim.engine.order_book(), key=lambda o: o.broker_order_id, reverse=True)
    return _list([noren_order(sim, sim.engine.get(o.broker_order_id), uid) for o in orders])


def single_order_history(sim: NorenSim, data: dict, uid: str) -> Response:
    o = sim.engine.get(data.get("norenordno", ""))
    return _list([noren_order(sim, o, uid)] if o else [])


def trade_book(sim: NorenSim, data: dict, uid: str) -> Response:
    out = []
    for view in sim.engine.order_book():
        o = sim.engine.get(view.broker_order_id)
        for f in o.fills:
            out.append({"stat": "Ok", "norenordno": o.broker_order_id, "exch": o.req.exchange, "tsym": o.req.symbol,
                        "trantype": "B" if o.req.side is Side.BUY else "S", "prd": o.req.product.value,
                        "flid": f.fill_id, "flqty": str(f.qty), "flprc": str(f.price), "qty": str(o.req.qty),
                        "remarks": o.req.remarks, "fltm": time.strftime("%d-%m-%Y %H:%M:%S")})
    return _list(out)


def position_book(sim: NorenSim, data: dict, uid: str) -> Response:
    out = []
    for (ex, sym, prod), p in sim.engine.positions().items():
        inst = sim.instruments.get(ex, sym)
        ltp = sim.engine.ltp(ex, sym) or Decimal("0")
        out.append({"stat": "Ok", "exch": ex, "tsym": sym, "token": inst.token if inst else "", "prd": prod,
                    "netqty": str(p.net_qty), "netavgprc": str(p.avg_price), "rpnl": str(p.realized_pnl),
                    "urmtom": str(p.unrealized(ltp)), "lp": str(ltp), "ls": str(inst.lot_size if inst else 1)})
    return _list(out)


def limits(sim: NorenSim, data: dict, uid: str) -> Response:
    return _ok(actid=uid, prfname="SIM", cash="1000000.00", payin="0.00", marginused="0.00")


def search_scrip(sim: NorenSim, data: dict, uid: str) -> Response:
    text = unquote_plus(data.get("stext", "")).upper()
    values = [{"exch": i.exchange, "token": i.token, "tsym": i.symbol, "ls": str(i.lot_size), "ti": str(i.tick_size)}
              for i in sim.instruments.by_symbol.values() if i.exchange == data.get("exch") and text in i.symbol]
    return _ok(values=values) if values else _not_ok("no data")


def _instrument_reply(sim: NorenSim, data: dict, uid: str) -> Response:
    inst = sim.instruments.token(data.get("exch", ""), str(data.get("token", "")))
    if inst is None:
        return _not_ok("no data")
    ltp = sim.engine.ltp(inst.exchange, inst.symbol)
    return _ok(exch=inst.exchange, tsym=inst.symbol, token=inst.token, ls=str(inst.lot_size), ti=str(inst.tick_size),
               frzqty=str(inst.freeze_qty or ""), lp=str(ltp) if ltp is not None else "0.00")


ROUTES: dict[str, Callable[[NorenSim, dict, str], Response]] = {
    "QuickAuth": quick_auth, "GenAcsTok": gen_acs_tok, "Logout": logout, "PlaceOrder": place_order,
    "ModifyOrder": modify_order, "CancelOrder": cancel_order, "OrderBook": order_book,
    "SingleOrdHist": single_order_history, "TradeBook": trade_book, "PositionBook": position_book,
    "Limits": limits, "SearchScrip": search_scrip, "GetQuotes": _instrument_reply,
    "GetSecurityInfo": _instrument_reply,
}
