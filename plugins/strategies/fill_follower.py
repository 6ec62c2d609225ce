"""Fill follower: reacts to its own fills with strategy_on_order.

TradingView sends only the entry. When that entry fills, this strategy places a protective
stop-loss (SL-MKT) `stop_points` away from the fill price, for the filled quantity. When the
stop fills, it notes the trade in its state. Alerts pass through unchanged (no strategy_on_alert).
"""
from decimal import Decimal

from host import ExecutionType, Intent, OrderStatus, OrderType, Side, hookimpl


@hookimpl
def strategy_meta():
    return {"name": "fill_follower", "version": "1.0", "api_version": 1, "params": {"stop_points": "5"}}


@hookimpl
def strategy_on_order(ctx, order):
    if order.status is not OrderStatus.FILLED:
        return None
    if order.action is ExecutionType.ENTRY:
        gap = Decimal(ctx.params["stop_points"])
        trigger = order.avg_price - gap if order.side is Side.BUY else order.avg_price + gap
        ctx.state.setdefault("stops", {})[order.id] = str(trigger)
        return [Intent(order.exchange, order.symbol, order.side.opposite, order.filled_qty, OrderType.SL_MKT,
                       order.product, trigger_price=trigger, action=ExecutionType.EXIT)]
    ctx.state["closed_trades"] = ctx.state.get("closed_trades", 0) + 1
    return None
