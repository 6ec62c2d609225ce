"""Moving-average cross: a tick-driven strategy that enters on a cross and exits at a stop or a time.

It keeps the last `slow` prices of its symbol. When the fast average crosses above the slow one
while flat, it buys `qty` at market. While long, it sells everything when the price falls
`stop_pct` percent below its entry, or at `exit_at` (Asia/Kolkata). Its price history and entry
live in `ctx.state`, so they survive a reload or a restart.

Feed it prices with POST /api/paper/ticks (paper) or the live feed.
"""
from decimal import Decimal

from host import ExecutionType, Intent, OrderType, Product, Side, hookimpl

EXCHANGE, SYMBOL = "NSE", "NIFTYBEES-EQ"


@hookimpl
def strategy_meta():
    return {"name": "ma_cross", "version": "1.0", "api_version": 1,
            "symbols": [f"{EXCHANGE}:{SYMBOL}"],
            "params": {"fast": 3, "slow": 5, "qty": 10, "stop_pct": "1.0", "exit_at": "15:10"}}


@hookimpl
def strategy_validate(params):
    problems = []
    if not 0 < int(params["fast"]) < int(params["slow"]):
        problems.append(f"fast must be above 0 and below slow, found fast={params['fast']} slow={params['slow']}")
    if int(params["qty"]) <= 0:
        problems.append(f"qty must be positive, found {params['qty']}")
    return problems


@hookimpl
def strategy_start(ctx):
    ctx.state.setdefault("prices", [])
    ctx.logger.info("ma_cross v%s starting with %d prices remembered", ctx.version, len(ctx.state["prices"]))


def _order(side, qty, action):
    return Intent(EXCHANGE, SYMBOL, side, qty, OrderType.MKT, Product.MIS, action=action)


@hookimpl
def strategy_on_tick(ctx, tick):
    p = ctx.params
    prices = (ctx.state["prices"] + [str(tick.ltp)])[-int(p["slow"]) - 1:]
    ctx.state["prices"] = prices
    held = ctx.position(EXCHANGE, SYMBOL)
    if held > 0:
        entry = Decimal(ctx.state.get("entry", tick.ltp))
        if tick.ltp <= entry * (1 - Decimal(p["stop_pct"]) / 100):
            return [_order(Side.SELL, held, ExecutionType.EXIT)]
        return None
    if held == 0 and not ctx.open_orders and len(prices) > int(p["slow"]):
        values = [Decimal(x) for x in prices]
        fast_now, slow_now = _avg(values[-int(p["fast"]):]), _avg(values[-int(p["slow"]):])
        fast_before, slow_before = _avg(values[-int(p["fast"]) - 1:-1]), _avg(values[-int(p["slow"]) - 1:-1])
        if fast_before <= slow_before and fast_now > slow_now:
            ctx.state["entry"] = str(tick.ltp)
            return [_order(Side.BUY, int(p["qty"]), ExecutionType.ENTRY)]
    return None


@hookimpl
def strategy_on_clock(ctx, now):
    held = ctx.position(EXCHANGE, SYMBOL)
    if held > 0 and now.strftime("%H:%M") >= ctx.params["exit_at"]:
        return [_order(Side.SELL, held, ExecutionType.EXIT)]
    return None


def _avg(values):
    return sum(values) / len(values)
